"Killed and interrupted runs: locks die with their run, no write goes through a link, resumes end as whole runs end"
import importlib.util, os, signal, subprocess, sys, time
from pathlib import Path
import pytest, yaml
from aliprod.core import project_root

ROOT = project_root()
ALIPROD = str(Path(sys.executable).parent/'aliprod')
_spec = importlib.util.spec_from_file_location('kill_resume', ROOT/'benchmarks'/'kill_resume.py')
kr = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(kr)

# enough images (about 1,000, five chunks of the generator, four of the scan) that the data stage runs worker pools
POOL_DATA = {'n_classes': 24, 'family_size': 4, 'max_per_class': 80, 'min_per_class': 3, 'val_per_class': 3,
             'test_per_class': 3, 'img_size': 32, 'img_size_max': 48, 'gen_workers': 2, 'scan_workers': 2}
# a run that trains in seconds: 12 classes at 32 px, a tiny timm test network, 2 epochs
TINY = {'data': {'n_classes': 12, 'family_size': 3, 'max_per_class': 30, 'min_per_class': 6, 'val_per_class': 3,
                 'test_per_class': 3, 'img_size': 32, 'img_size_max': 40, 'gen_workers': 2, 'scan_workers': 2},
        'train': {'arch': 'test_efficientnet_ln', 'pretrained': False, 'optimizer': 'sgd', 'wd': 0.0005,
                  'img_size': 32, 'finetune_size': None, 'finetune_epochs': 0, 'epochs': 2, 'bs': 32, 'lr': 0.05,
                  'warmup_epochs': 1, 'milestones': [2], 'eval_splits': ['val']},
        'pipeline': {'html': False, 'stages': ['train']}}


def _params(tmp_path:Path, name:str, **sections)->Path:
    f = tmp_path/f'{name}.yaml'
    f.write_text(yaml.safe_dump({'experiment': name, 'runs_dir': str(tmp_path/'runs'),
                                 'reports_dir': str(tmp_path/'reports'), **sections}, sort_keys=False))
    return f


def _wait_for_worker(proc:subprocess.Popen, timeout:float=120)->list[int]:
    "Block until `proc` has forked a worker (a child with its command line); the processes below it"
    me, t0 = kr._cmdline(proc.pid), time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f'the run ended (rc {proc.returncode}) before its worker pool started'
        below = kr.descendants(proc.pid)
        if any(kr._cmdline(c) == me for c in below): return below
        time.sleep(0.01)
    pytest.fail(f'no worker process in {timeout} s')


def _kill_all(pids):
    for p in pids:
        try: os.kill(p, signal.SIGKILL)
        except ProcessLookupError: pass


def test_symlinked_lock_is_refused_and_its_target_kept(tmp_path):
    "A runs/ tree from elsewhere with `.lock -> a file of ours`: the run stops naming the link, the file is intact"
    victim = tmp_path/'victim.txt'; victim.write_text('precious\n')
    (tmp_path/'runs'/'lk'/'data').mkdir(parents=True)
    os.symlink(victim, tmp_path/'runs'/'lk'/'data'/'.lock')
    r = subprocess.run([ALIPROD, 'data', str(_params(tmp_path, 'lk'))], capture_output=True, text=True, cwd=ROOT,
                       timeout=240)
    assert victim.read_text() == 'precious\n'
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{tmp_path}/runs/lk/data/.lock is a symbolic link (to {victim})" in r.stderr, r.stderr[-2000:]


def _as_from_a_terminal():
    "In the child before exec: SIGINT at its default disposition and not blocked, as a shell's foreground job has it"
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_state(pid:int)->str:
    "The SigBlk/SigIgn/SigCgt lines of a process: why a SIGINT was not acted on"
    try: lines = Path(f'/proc/{pid}/status').read_text().splitlines()
    except OSError: return 'gone'
    return ' '.join(l for l in lines if l.startswith(('SigBlk', 'SigIgn', 'SigCgt')))


def test_second_run_of_an_experiment_is_refused_and_ctrl_c_is_one_line(tmp_path):
    "While `aliprod run` holds an experiment a second one fails at once, naming it; Ctrl-C ends the first: rc 130"
    # 40 epochs: the first run is still training when the second has imported torch, however loaded the machine
    f = _params(tmp_path, 'busy', **{**TINY, 'data': POOL_DATA, 'train': {**TINY['train'], 'epochs': 40}})
    # as from a terminal: SIGINT handled and unblocked in the run, whatever an earlier test left in this (xdist) worker
    # process (an ignored or blocked SIGINT is inherited across exec, and Python then never raises KeyboardInterrupt)
    first = subprocess.Popen([ALIPROD, 'run', str(f), '--in-process'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, preexec_fn=_as_from_a_terminal)
    below = []
    try:
        below = _wait_for_worker(first)   # inside the run: the data stage's pool
        try: second = subprocess.run([ALIPROD, 'run', str(f), '--in-process'], capture_output=True, text=True, cwd=ROOT,
                                     timeout=300)
        except subprocess.TimeoutExpired: pytest.fail('the second run did not fail fast')
        assert first.poll() is None, 'the first run ended before the second was refused'
        assert second.returncode == 1, second.stderr[-2000:]
        said = f"experiment 'busy' is being run already: another process (pid {first.pid} on "
        assert said in second.stderr, second.stderr[-2000:]
        state = _sigint_state(first.pid)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=300)   # generous: CI shares 2 cores with a second pytest worker
    finally:
        if first.poll() is None: first.kill(); first.wait()
        _kill_all(kr.alive(below))
    assert first.returncode == 130, f'{state}\n{err[-3000:]}'
    assert 'Traceback' not in err and err.strip().splitlines()[-1].startswith('aliprod: interrupted'), err[-3000:]


class _AtOnce:
    "A `random.Random` stand-in whose draws are the lower bound: kill_resume's kill delay becomes 0"
    def uniform(self, a, b): return a


def test_killed_runs_resume_to_identical_outputs(tmp_path):
    """Killed in the data stage's pool, then in training: no worker outlives it; each rerun takes the stale lock at once,
    says so, and ends with an uninterrupted run's bytes and no temp file"""
    # 20 epochs (a few seconds): the kill lands within half the training after epoch 1 (its log's 1 s resolution);
    # with 2 epochs of a fraction of a second each, a quiet machine finished training before the kill
    kill = {**TINY, 'train': {**TINY['train'], 'epochs': 20, 'milestones': [15]}}
    cmd = kr.command(_params(tmp_path, kr.EXPERIMENT, **kill), in_process=True)
    ref = kr.reference(cmd, tmp_path, timeout=600)
    assert ref.get('epoch_s', 0) >= 2, ref   # training long enough that a kill after epoch 1 falls inside it
    assert ref['hashes'] and not ref['temp_files_left']
    rng = kr.random.Random(0)
    for point, stage_dir in (('data-pool', 'data'), ('epoch', 'train/0')):
        # ok: no worker outlived the kill (10 s), the rerun did not wait on a lock, no temp file, outputs byte-identical
        # the data-pool kill comes the moment a forked worker is seen (a random delay lets a loaded machine's tiny pool
        # finish first, and then there is no worker to outlive the run)
        r = kr.trial(point, cmd, tmp_path, _AtOnce() if point == 'data-pool' else rng, ref, timeout=600)
        assert r['ok'], r
        if point == 'data-pool': assert r['processes_below'], 'killed while its pool had workers: none outlived it'
        # the rerun saw the killed run's name in the killed stage's lock file and said so
        said = (tmp_path/'rerun.log').read_text()
        lock = f'stale lock on {tmp_path}/runs/{kr.EXPERIMENT}/{stage_dir} left by pid '
        assert lock in said and 'which is gone' in said, said[-3000:]
