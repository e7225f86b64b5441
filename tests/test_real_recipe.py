"The run a real user makes: `params/aliproducts.yaml` itself, shrunk by size-only overrides, on AliProducts-JSON data without a test split"
import json, subprocess, sys
from pathlib import Path
import numpy as np, pytest, yaml
from PIL import Image
from aliprod.core import project_root

ROOT = project_root()
ALIPROD = str(Path(sys.executable).parent/'aliprod')

# class sizes of a small, very long tail; siblings (pairs of near colours) are confused by the label noise
TRAIN_COUNTS = [24, 18, 14, 10, 8, 6, 5, 4]
VAL_PER_CLASS = 4
NOISE = 0.2


def _image(k:int, rng, size:int=40)->Image.Image:
    "A product-like picture of class k: a background, a coloured box whose colour and stripe count say the class"
    family, member = divmod(k, 2)
    hue = np.array([[200, 40, 40], [40, 160, 60], [50, 70, 200], [200, 170, 30]])[family % 4]
    a = np.full((size, size, 3), 235, np.float32) + rng.normal(0, 8, (size, size, 3))
    x0, y0 = rng.integers(2, 10, 2)
    a[y0:y0 + 24, x0:x0 + 22] = hue + 25 * member
    for s in range(member + 1): a[y0 + 4 + 7 * s:y0 + 7 + 7 * s, x0 + 2:x0 + 20] = 255 - hue / 2
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def make_aliproducts(root:Path, counts=TRAIN_COUNTS, val_per_class=VAL_PER_CLASS, noise=NOISE, seed=0, with_val=True)->Path:
    "train.json (+ val.json) and the image trees, in the challenge's layout; noisy train labels point at the sibling class"
    rng = np.random.default_rng(seed)
    splits = {'train': counts, **({'val': [val_per_class] * len(counts)} if with_val else {})}
    for split, per_class in splits.items():
        recs = []
        for k, n in enumerate(per_class):
            for j in range(n):
                given = k ^ 1 if split == 'train' and rng.random() < noise else k   # sibling-class noise
                cid, name = f'{given:05d}', f'{split}_{k}_{j}.jpg'
                (root/split/cid).mkdir(parents=True, exist_ok=True)
                _image(k, rng).save(root/split/cid/name, quality=90)
                recs.append({'class_id': cid, 'image_id': name})
        (root/f'{split}.json').write_text(json.dumps({'images': recs}))
    return root


# Only sizes, devices and locations change; every technique, stage and order of the real recipe stays
SIZE_ONLY = {
    'device': 'cpu',
    'data': {'scan_workers': 2, 'many_threshold': 12, 'few_threshold': 6},
    'train': {'arch': 'test_efficientnet', 'pretrained': False, 'img_size': 32, 'finetune_size': 40, 'epochs': 2,
              'finetune_epochs': 1, 'warmup_epochs': 1, 'milestones': [2], 'bs': 16, 'gpus': 1, 'workers': 0,
              'amp': False, 'embed_dim': 16},
    'rebalance': {'crt_epochs': 1, 'batch_size': 16, 'head_cap': 12, 'subset_per_class': 6, 'network_epochs': 1},
    'finegrained': {'epochs': 1, 'img_size': 48, 'head_cap': 6, 'dcl_patches': 2, 'lio_positives': 1},
    'tta': {'bs': 16, 'workers': 0},
    # a backbone trained for seconds is near chance, and the round guard rightly refuses to clean with it (tested in
    # tests/test_clean.py); here the recipe's cleaning rounds must run, so the guard is told to let them
    'clean': {'allow_aggressive': True},
}
MEMBER_ARCHS = {'resnest101': 'test_resnet', 'deit_s': 'test_vit'}   # the ensemble's other backbones, shrunk the same way


def shrink(params:Path, out:Path, data_root:Path, tmp:Path, extra:dict|None=None)->Path:
    "A copy of `params` with the size-only overrides, its data root and run/report directories in `tmp`"
    cfg = yaml.safe_load(params.read_text())
    for k, v in {**SIZE_ONLY, **(extra or {})}.items():
        if isinstance(v, dict): cfg.setdefault(k, {}).update(v)
        else: cfg[k] = v
    cfg['data']['root'] = str(data_root)
    cfg['runs_dir'], cfg['reports_dir'] = str(tmp/'runs'), str(tmp/'reports')
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _run(*args, cwd=ROOT):
    r = subprocess.run([ALIPROD, *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, f'aliprod {" ".join(map(str, args))} exited {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}'
    return r


@pytest.mark.timeout(1500)
def test_aliproducts_recipe_without_test_split(tmp_path):
    "Every stage of params/aliproducts.yaml, in its order, on challenge-layout data with train and val only; the report names val"
    data = make_aliproducts(tmp_path/'aliproducts')
    p = shrink(ROOT/'params'/'aliproducts.yaml', tmp_path/'aliproducts.yaml', data, tmp_path)
    cfg = yaml.safe_load(p.read_text())
    order = cfg['pipeline']['stages']
    assert order.index('ensemble') > order.index('tta')
    from aliprod.pipeline import main   # `aliprod check`, in this process: the CLI's exit codes are tested in test_pipeline.py
    assert main(['check', str(p)]) == 0
    # the stages before the ensemble, in the file's order; then the ensemble's other backbones on the last cleaned index
    r = _run('run', p, '--stages', *order[:order.index('ensemble')])
    # the terminal shows progress from inside the stage kernels: a line per stage and per epoch, with time left
    out = r.stdout
    assert f'stage 1/{order.index("ensemble")} train:' in out and 'train/0: epoch 1/3 [32px main] train loss' in out, out[-3000:]
    assert 'val mean class error' in out and ' left' in out
    for noise in ('TCP without encryption', 'IProgress not found', 'torch.jit.script', 'not writable'):
        assert noise not in r.stdout + r.stderr, f'terminal noise a user cannot act on: {noise!r}'
    from aliprod.config import resolve_params
    from aliprod.rundirs import resolve_iteration
    from aliprod.train import run_train
    from aliprod.rebalance import run_rebalance
    import dataclasses
    exp, dp, tp, rp = (resolve_params(s, p) for s in ('experiment', 'data', 'train', 'rebalance'))
    for m in cfg['ensemble']['members']:
        kind, *rest = m.split(':')
        if kind == 'train' and rest[0] in MEMBER_ARCHS:
            it = resolve_iteration(exp, int(rest[1]) if rest[1].isdigit() else rest[1])   # 'kept': the round the clean stage kept
            mt = dataclasses.replace(tp, tag=rest[0], arch=MEMBER_ARCHS[rest[0]], iteration=it,
                                     finetune_size=None if MEMBER_ARCHS[rest[0]] == 'test_vit' else tp.finetune_size,
                                     finetune_epochs=0 if MEMBER_ARCHS[rest[0]] == 'test_vit' else tp.finetune_epochs)
            run_train(exp, dp, mt)
            # the 2021 system rebalances every backbone: its heads go to rebalance-<tag>/, candidates of the system's ensemble
            run_rebalance(exp, dp, mt, dataclasses.replace(rp, iteration=it, finetune='classifier'))
    _run('run', p, '--stages', *order[order.index('ensemble'):])
    rep = tmp_path/'reports'/cfg['experiment']
    page = (rep/'index.html').read_text()
    # the final system is reported on val's reporting images ('val' alone would match 'interval')
    assert 'reporting images of the val split' in page and 'of the test split' not in page
    assert 'test' not in json.dumps(sorted(p.name for p in rep.glob('*.csv')))
    runs = tmp_path/'runs'/cfg['experiment']
    assert not list(runs.glob('**/predictions/test.parquet')), 'no test split: nothing may predict one'
    from aliprod.escape import read_csv_safe   # the CSV escapes cells a spreadsheet would run: '+ x' is written "'+ x"
    cands = read_csv_safe(rep/'system_candidates.csv')['candidate'].astype(str).str.removeprefix('+ ')   # '+ x': x added to the ensemble
    for tag in MEMBER_ARCHS:   # every backbone's rebalanced heads are candidates of the final system, not only its plain model
        assert cands.str.startswith(f'rebalance-{tag}:').any() and cands.str.startswith(f'train-{tag}:').any(), sorted(set(cands))
    # a stage run executed the stage only: the executed notebooks' cells above `parameters` produced nothing
    for nb in (rep/'notebooks').glob('*.ipynb'):
        cells = json.loads(nb.read_text())['cells']
        i = next(i for i, c in enumerate(cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
        ran = [c for c in cells[:i] if c['cell_type'] == 'code' and c.get('outputs')]
        assert not ran, f'{nb.name}: cells above parameters produced output in a stage run'
    # a second run with the same parameters recomputes nothing; in-process (no kernel per stage): the same stage functions,
    # called with the parameters `call_stage` resolves, so the notebooks' run cells and it must agree on every run's key
    r = _run('run', p, '--in-process')
    assert 'into' not in ''.join(l for l in r.stdout.splitlines() if ('running' in l or 'into' in l) and 'report' not in l), r.stdout[-3000:]
    for s in order[:-1]: assert f'{s}: up to date, nothing recomputed' in r.stdout, (s, r.stdout[-3000:])
