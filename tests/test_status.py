"Issue #23 item 2: `aliprod status` (per run folder: up to date / stale and why / missing / ...) and `--help`"
import json, re, subprocess, sys
from pathlib import Path
import pytest, yaml
from aliprod.pipeline import main

# a run that trains in seconds: 5 classes at 32 px, a tiny timm test network, 1 epoch (the shapes of test_faults.TINY)
TINY = {'data': {'n_classes': 5, 'family_size': 5, 'max_per_class': 30, 'min_per_class': 6, 'val_per_class': 3,
                 'test_per_class': 0, 'img_size': 32, 'img_size_max': 40, 'gen_workers': 1, 'scan_workers': 1},
        'train': {'arch': 'test_efficientnet', 'pretrained': False, 'embed_dim': 16, 'optimizer': 'sgd', 'wd': 0.0005,
                  'img_size': 32, 'finetune_size': None, 'finetune_epochs': 0, 'epochs': 1, 'bs': 16, 'lr': 0.05,
                  'warmup_epochs': 0, 'milestones': [1], 'eval_splits': ['val']},
        'pipeline': {'html': False, 'stages': ['train']}}


def write_params(tmp:Path, **train)->Path:
    f = tmp/'st.yaml'
    f.write_text(yaml.safe_dump({'experiment': 'st', 'seed': 0, 'runs_dir': str(tmp/'runs'),
                                 'reports_dir': str(tmp/'reports'), **TINY, 'train': {**TINY['train'], **train}},
                                sort_keys=False))
    return f


def status_rows(f:Path, capsys)->dict[str, str]:
    "run dir -> the rest of its line in `aliprod status f` (exit code 0 checked)"
    capsys.readouterr()
    assert main(['status', str(f)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("experiment 'st'") and lines[1].split()[:2] == ['stage', 'run'], lines
    return {l.split()[1]: l for l in lines[2:]}


def tree(d:Path)->dict:
    "Every path under `d` with its bytes and modification time"
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(d.rglob('*'))}


def test_status_before_after_run_and_after_edits(tmp_path, capsys):
    f = write_params(tmp_path)
    rows = status_rows(f, capsys)
    data, train = str(tmp_path/'runs'/'st'/'data'), str(tmp_path/'runs'/'st'/'train')
    assert list(rows) == [data, train]
    assert all('missing' in l and l.endswith('not run') for l in rows.values()), rows
    assert not (tmp_path/'runs').exists(), 'status created folders'

    assert main(['run', str(f), '--in-process']) == 0
    before = tree(tmp_path)
    rows = status_rows(f, capsys)
    assert list(rows) == [data, train + '/0']
    for l in rows.values():   # and the last duration, the time it finished
        assert re.search(r' up to date +\d+ s +20\d\d-\d\d-\d\dT', l), l
    assert tree(tmp_path) == before, 'status wrote something'

    write_params(tmp_path, lr=0.1)   # one parameter edited
    rows = status_rows(f, capsys)
    assert ' up to date ' in rows[data]
    assert ' stale ' in rows[train + '/0'] and rows[train + '/0'].endswith('train.lr: 0.05 -> 0.1'), rows
    write_params(tmp_path)

    ds = tmp_path/'runs'/'st'/'data'/'dataset.json'   # the data stage's output, the train stage's input
    ds.write_text(ds.read_text() + '\n')
    rows = status_rows(f, capsys)
    assert ' stale ' in rows[data] and rows[data].endswith('output dataset.json changed'), rows
    assert ' stale ' in rows[train + '/0'] and rows[train + '/0'].endswith(f'input {ds} changed'), rows

    (tmp_path/'runs'/'st'/'train'/'0'/'manifest.json').unlink()
    rows = status_rows(f, capsys)
    assert ' failed or unfinished ' in rows[train + '/0'] and 'no manifest' in rows[train + '/0'], rows

    # another process holds the train folder's stage lock (as a running stage does): 'running', with its pid
    lock = tmp_path/'runs'/'st'/'train'/'0'/'.lock'
    code = ('import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX)\n'
            'os.pwrite(fd, f"{os.getpid()} host 2026-01-01T00:00:00\\n".encode(), 0)\n'
            'print("locked", flush=True); time.sleep(60)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        before = tree(tmp_path)
        rows = status_rows(f, capsys)
        assert ' running ' in rows[train + '/0'] and f'lock held by pid {holder.pid}' in rows[train + '/0'], rows
        assert tree(tmp_path) == before, 'status wrote something (or took the lock)'
    finally:
        holder.kill(); holder.wait()


@pytest.mark.parametrize('cmd', [[], ['run'], ['status'], ['check']])
def test_help_documents_params_and_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e: main([*cmd, '--help'])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert 'examples:' in out and 'aliprod status params/demo.yaml' in out, out
    assert 'aliprod run params/demo.yaml' in out, out
    if cmd: assert 'a YAML parameter file, e.g. params/demo.yaml' in ' '.join(out.split()), out


def write_chain(tmp:Path, **train)->Path:
    "TINY with a cleaning round and a rebalance of the kept round: train, clean, rebalance ([clean] iteration a budget)"
    f = write_params(tmp, **{'eval_splits': ['train', 'val'], **train})
    cfg = yaml.safe_load(f.read_text())
    cfg.update(clean={'iteration': 1, 'allow_aggressive': True},   # the tiny model is near chance: clean anyway
               rebalance={'iteration': 'kept', 'methods': ['crt'], 'crt_epochs': 1},
               pipeline={'html': False, 'stages': ['train', 'clean', 'rebalance']})
    f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f


def test_status_compares_the_config_a_run_recorded(tmp_path, capsys):
    "#23: right after a run every folder is up to date (a round's model, 'kept', a budget); an edit names itself"
    f = write_chain(tmp_path)
    assert main(['run', str(f), '--in-process']) == 0
    runs = tmp_path/'runs'/'st'
    folders = [runs/'data', runs/'train'/'0', runs/'train'/'1', runs/'clean'/'1', runs/'rebalance'/'0']
    rows = status_rows(f, capsys)
    assert list(rows) == [str(d) for d in folders], rows
    for l in rows.values(): assert re.search(r' up to date +\d+ s +20\d\d-\d\d-\d\dT\S+$', l), l
    m = json.loads((runs/'clean'/'1'/'manifest.json').read_text())
    assert m['config']['stage'] == 'clean' and m['config']['sections']['clean']['iteration'] == 1, m['config']
    # train/1 is clean's retraining (its key: iteration 1): it records the config of the stage that ran it
    m = json.loads((runs/'train'/'1'/'manifest.json').read_text())
    assert m['config']['stage'] == 'clean' and m['params']['iteration'] == 1, m

    write_chain(tmp_path, lr=0.1)   # every stage that reads [train] is stale, for that one key; the data is not
    rows = status_rows(f, capsys)
    assert ' up to date ' in rows[str(runs/'data')], rows
    for d in folders[1:]:
        assert ' stale ' in rows[str(d)] and rows[str(d)].endswith('  train.lr: 0.05 -> 0.1'), rows[str(d)]
    write_chain(tmp_path, workers=2)   # no training run keys workers: neither they nor the round built on them
    rows = status_rows(f, capsys)
    for d in folders[:4]: assert ' up to date ' in rows[str(d)], rows[str(d)]
    write_chain(tmp_path)

    # a manifest from before configs were kept: its key's parameters compared key by key, and said so
    man = runs/'rebalance'/'0'/'manifest.json'
    m = json.loads(man.read_text()); del m['config']; man.write_text(json.dumps(m))
    row = status_rows(f, capsys)[str(runs/'rebalance'/'0')]
    assert ' stale ' in row and row.endswith('  rebalance.iteration: 0 -> "kept" (recorded before configs were kept)'), row
