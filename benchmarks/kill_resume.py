"""Kill `aliprod run` with SIGKILL at random points, rerun it each time, and check that every rerun completes without
waiting on a lock, leaves no temp file, and writes outputs byte-identical to an uninterrupted run.

    nice -n 10 .venv/bin/python benchmarks/kill_resume.py                       # params/smoke.yaml, 20 kills
    .venv/bin/python benchmarks/kill_resume.py --params my.yaml --kills 4 --in-process

Kill points, taken in turn (the order shuffled by --seed): `data-pool` (a worker of the data stage's process pool is
running), `epoch` (a random moment of training), `checkpoint` (a checkpoint's temp file is being written) and `clean`
(a random moment of the clean stage). Each trial starts from an empty run directory. Prints a table and writes JSON
(default benchmarks/results/kill_resume.json).
"""
from __future__ import annotations
import argparse, hashlib, json, os, random, re, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]
POINTS = ('data-pool', 'epoch', 'checkpoint', 'clean')
EXPERIMENT = 'killresume'


def _ppids()->dict[int, int]:
    "pid -> parent pid of every process on the machine (from /proc)"
    out = {}
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        try: stat = Path(f'/proc/{d}/stat').read_text()
        except OSError: continue
        out[int(d)] = int(stat.rsplit(')', 1)[1].split()[1])
    return out


def descendants(pid:int)->list[int]:
    "The processes below `pid` (children, their children, ...)"
    ppid, out, todo = _ppids(), [], [pid]
    while todo:
        p = todo.pop(); kids = [c for c, pp in ppid.items() if pp == p]
        out += kids; todo += kids
    return out


def _cmdline(pid:int)->bytes:
    try: return Path(f'/proc/{pid}/cmdline').read_bytes()
    except OSError: return b''


def alive(pids)->list[int]:
    "Those of `pids` still running (zombies count as gone)"
    out = []
    for p in pids:
        try: state = Path(f'/proc/{p}/stat').read_text().rsplit(')', 1)[1].split()[0]
        except OSError: continue
        if state != 'Z': out.append(p)
    return out


def scratch_params(params:str|Path, scratch:Path, stages:list[str]|None=None)->Path:
    "A copy of `params` whose runs and reports go under `scratch` (experiment 'killresume', no HTML)"
    cfg = yaml.safe_load(Path(params).read_text()) or {}
    cfg.update(experiment=EXPERIMENT, runs_dir=str(scratch/'runs'), reports_dir=str(scratch/'reports'))
    cfg.setdefault('pipeline', {})['html'] = False
    if stages: cfg['pipeline']['stages'] = list(stages)
    out = scratch/'params.yaml'; out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def command(params:Path, in_process:bool)->list[str]:
    return [str(Path(sys.executable).parent/'aliprod'), 'run', str(params), *(['--in-process'] if in_process else [])]


def output_hashes(scratch:Path)->dict[str, str]:
    "sha256 of every model.pth, predictions parquet and index parquet of the run"
    base = scratch/'runs'/EXPERIMENT
    files = [*base.glob('**/model.pth'), *base.glob('**/predictions/*.parquet'), *base.glob('**/index.parquet')]
    return {str(f.relative_to(base)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


def temp_files(scratch:Path)->list[str]:
    "Temp files and folders left anywhere under the run's runs/ and reports/"
    return sorted(str(p.relative_to(scratch)) for d in ('runs', 'reports') for p in (scratch/d).rglob('*.tmp'))


def wipe(scratch:Path):
    for d in ('runs', 'reports'): shutil.rmtree(scratch/d, ignore_errors=True)


def run_to_end(cmd:list[str], log:Path, timeout:float)->dict:
    "Run `cmd` to completion (or `timeout`); rc, wall time, and what its output says about locks"
    t0 = time.time()
    with open(log, 'w') as f:
        try: rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired: rc = 'timeout'
    text = log.read_text()
    return {'rc': rc, 'wall_s': round(time.time() - t0, 1), 'waited_on_lock': 'waiting for it' in text,
            'said_stale': 'stale lock' in text}


def _trigger(point:str, proc:subprocess.Popen, log:Path, scratch:Path, rng:random.Random, ref:dict,
             scale:float=1.0, seen:set|None=None)->str|None:
    """Wait for `point` in the running `proc`; None once it has been reached (then kill), else why it was missed; the
    pool workers seen at 'data-pool' go into `seen`"""
    parent = _cmdline(proc.pid)
    train_dir = scratch/'runs'/EXPERIMENT/'train'/'0'
    # training has begun (the first epoch ended) / the clean stage works; then a random moment within half of the time
    # that phase took in the uninterrupted run, so that a run a little faster than it is still killed
    line = {'epoch': re.compile(r'train/0: epoch 1/'), 'clean': re.compile(r'\bclean: iteration ')}.get(point)
    delay = {'data-pool': rng.uniform(0, 0.2), 'epoch': rng.uniform(0, ref.get('epoch_s', 5) / 2),
             'clean': rng.uniform(0, ref.get('clean_s', 5) / 2), 'checkpoint': 0.0}[point]
    while proc.poll() is None:
        if point == 'data-pool':
            # a forked worker: the same command line
            workers = [c for c in descendants(proc.pid) if _cmdline(c) == parent]
            if workers:
                # a tiny pool's worker can exit before the kill: the caller checks these too
                if seen is not None: seen.update(workers)
                break
            time.sleep(0.005)
        elif point == 'checkpoint':
            try:
                if any(n.startswith('.checkpoint.pth.') and n.endswith('.tmp') for n in os.listdir(train_dir)): break
            except FileNotFoundError: pass
            time.sleep(0.001)
        else:
            if line.search(log.read_text()): break
            time.sleep(0.02)
    else: return 'the run ended before the kill point'
    time.sleep(delay * scale)
    return None if proc.poll() is None else 'the run ended during the delay'


def trial(point:str, cmd:list[str], scratch:Path, rng:random.Random, ref:dict, timeout:float)->dict:
    "One kill at `point` and one rerun to completion; what happened"
    log = scratch/'killed.log'
    for attempt in range(3):   # a run faster than the reference can end before a random moment: again, sooner
        wipe(scratch)
        with open(log, 'w') as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        t0 = time.time()
        seen = set()
        missed = _trigger(point, proc, log, scratch, rng, ref, scale=0.5 ** attempt, seen=seen)
        if missed is None or proc.poll() is None: break
        proc.wait()
    # what ran below the run when it was killed, and the pool workers seen at the kill point (gone already or not)
    below = sorted(set(descendants(proc.pid)) | seen)
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = round(time.time() - t0, 2)
    deadline = time.time() + 10
    while alive(below) and time.time() < deadline: time.sleep(0.1)
    orphans = alive(below)
    for p in orphans:   # reported below; removed so that they cannot disturb the next trial
        try: os.kill(p, signal.SIGKILL)
        except ProcessLookupError: pass
    rerun = run_to_end(cmd, scratch/'rerun.log', timeout)
    hashes = output_hashes(scratch)
    left = temp_files(scratch)
    diff = sorted(k for k in set(hashes) | set(ref['hashes']) if hashes.get(k) != ref['hashes'].get(k))
    ok = missed is None and rerun['rc'] == 0 and not rerun['waited_on_lock'] and not orphans and not left and not diff
    return {'point': point, 'attempts': attempt + 1, 'killed_at_s': killed_at, 'missed': missed,
            'processes_below': len(below),
            'orphans': len(orphans), **{f'rerun_{k}': v for k, v in rerun.items()}, 'temp_files_left': left,
            'outputs_differing': diff, 'ok': ok}


def reference(cmd:list[str], scratch:Path, timeout:float)->dict:
    "The uninterrupted run: output hashes, wall time, how long training and the clean stage took (for the kill delays)"
    wipe(scratch)
    r = run_to_end(cmd, scratch/'reference.log', timeout)
    if r['rc'] != 0: raise SystemExit(f"the uninterrupted run failed (rc {r['rc']}); see {scratch/'reference.log'}")
    text = (scratch/'reference.log').read_text()
    t = lambda pat: [int(h) * 3600 + int(m) * 60 + int(s)
                     for h, m, s in re.findall(r'^(\d\d):(\d\d):(\d\d) ' + pat, text, re.M)]
    epochs, clean = t(r'train/0: epoch '), t(r'clean: iteration ')
    out = {**r, 'hashes': output_hashes(scratch), 'temp_files_left': temp_files(scratch)}
    if len(epochs) > 1: out['epoch_s'] = max(1, epochs[-1] - epochs[0])   # from the end of epoch 1 to the last
    if clean: out['clean_s'] = max(1, t(r'clean: done')[-1] - clean[0]) if t(r'clean: done') else 5
    return out


def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--params', default=str(ROOT/'params'/'smoke.yaml'))
    ap.add_argument('--kills', type=int, default=20)
    ap.add_argument('--points', nargs='+', choices=POINTS, default=list(POINTS))
    ap.add_argument('--stages', nargs='+', help="stages to run (default: the file's pipeline.stages, else all)")
    ap.add_argument('--in-process', action='store_true', help="run the stages' functions in the runner (no notebooks)")
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--timeout', type=float, default=1800, help='seconds a rerun may take before it counts as hung')
    ap.add_argument('--scratch', help='where the runs go (default: a new temp folder, removed at the end)')
    ap.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'kill_resume.json'))
    a = ap.parse_args(argv)
    if a.kills < 1: print('kill_resume: --kills must be >= 1', file=sys.stderr); return 2
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix='aliprod-kill-')); scratch.mkdir(parents=True, exist_ok=True)
    cmd = command(scratch_params(a.params, scratch, a.stages), a.in_process)
    rng = random.Random(a.seed)
    order = [a.points[i % len(a.points)] for i in range(a.kills)]; rng.shuffle(order)
    t0 = time.time()
    ref = reference(cmd, scratch, a.timeout)
    print(f"uninterrupted run: {ref['wall_s']} s, {len(ref['hashes'])} outputs hashed", flush=True)
    print(f"{'#':>3} {'kill point':<11} {'killed at':>9} {'below':>5} {'orphans':>7} {'rerun rc':>8} {'rerun s':>7} "
          f"{'stale':>5} {'waited':>6} {'tmp':>3} {'differ':>6}  ok", flush=True)
    trials = []
    for i, point in enumerate(order, 1):
        r = trial(point, cmd, scratch, rng, ref, a.timeout); trials.append(r)
        verdict = 'yes' if r['ok'] else 'NO: ' + (r['missed'] or 'see JSON')
        print(f"{i:>3} {point:<11} {r['killed_at_s']:>8}s {r['processes_below']:>5} {r['orphans']:>7} "
              f"{str(r['rerun_rc']):>8} {r['rerun_wall_s']:>7} {str(r['rerun_said_stale']):>5} "
              f"{str(r['rerun_waited_on_lock']):>6} {len(r['temp_files_left']):>3} {len(r['outputs_differing']):>6}  "
              f"{verdict}",
              flush=True)
    ok = sum(r['ok'] for r in trials)
    res = {'config': {'params': a.params, 'kills': a.kills, 'points': a.points, 'stages': a.stages,
                      'in_process': a.in_process, 'seed': a.seed, 'command': cmd},
           'reference': ref, 'trials': trials, 'ok': ok, 'total_s': round(time.time() - t0, 1),
           'hardware': {'cpus': os.cpu_count(), 'load_average': os.getloadavg()}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
    print(f"{ok}/{len(trials)} kills resumed to byte-identical outputs without waiting or leftovers; "
          f"{res['total_s']} s; {a.out}")
    if not a.scratch: shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok == len(trials) else 1


if __name__ == '__main__':
    sys.exit(main())
