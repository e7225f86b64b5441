"""The other layouts real data comes in: CSV (train + test, no val split), ImageFolder (train + val, no test split) and
list files (train / val / test), each indexed and trained on at smoke size. Every stage runs on the CSV layout, the one
whose val split is carved out of test; past the data stage the index is the same table whatever the layout, so the
other two stop after training (their images load): every stage without a test split runs on AliProducts JSON in
test_real_recipe.py (papermill), and an index with all three splits is the CSV layout's. `aliprod run --in-process`
calls each stage's library function, so this needs no kernel per stage."""
import json, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from test_real_recipe import _image   # the same product-like pictures: a coloured box whose colour and stripes say the class

ALIPROD = str(Path(sys.executable).parent/'aliprod')
COUNTS = [16, 10, 7, 5]     # train images per class: a small long tail
HELD = 4                    # val / test images per class
NAMES = ['red-a', 'red-b', 'green-a', 'green-b']


def _write_images(root:Path, splits:list[str], rng)->list[tuple[str, int, str]]:
    "Images under <root>/<split>/<class name>/, with sibling noise on train; (path, label, split) for each"
    rows = []
    for split in splits:
        for k, n in enumerate(COUNTS if split == 'train' else [HELD] * len(COUNTS)):
            for j in range(n):
                given = k ^ 1 if split == 'train' and rng.random() < 0.15 else k
                rel = f'{split}/{NAMES[given]}/{k}_{j}.jpg'
                (root/rel).parent.mkdir(parents=True, exist_ok=True)
                _image(k, rng).save(root/rel, quality=90)
                rows.append((rel, given, split))
    return rows


def make_csv(root:Path)->dict:
    "One CSV holding train and test (no val split), with a classes file"
    rows = _write_images(root, ['train', 'test'], np.random.default_rng(1))
    pd.DataFrame(rows, columns=['path', 'label', 'split']).to_csv(root/'index.csv', index=False)
    (root/'classes.txt').write_text('\n'.join(NAMES) + '\n')
    return {'source': 'csv', 'train_file': 'index.csv', 'classes_file': 'classes.txt'}


def make_imagefolder(root:Path)->dict:
    "<root>/train/<class>/ and <root>/val/<class>/: no test split, as in the challenge"
    _write_images(root, ['train', 'val'], np.random.default_rng(2))
    return {'source': 'imagefolder'}


def make_list(root:Path)->dict:
    "`path label` list files for train, val and test"
    rows = _write_images(root, ['train', 'val', 'test'], np.random.default_rng(3))
    for split in ('train', 'val', 'test'):
        (root/f'{split}.txt').write_text(''.join(f'{p} {y}\n' for p, y, s in rows if s == split))
    (root/'classes.txt').write_text('\n'.join(NAMES) + '\n')
    return {'source': 'list', 'train_file': 'train.txt', 'val_file': 'val.txt', 'test_file': 'test.txt', 'classes_file': 'classes.txt'}


# the splits each index has (without a val split, half of every class of test becomes val: data.val_from_test), and the
# stages run on it (None: every stage)
LAYOUTS = {'csv_no_val': (make_csv, {'train', 'val', 'test'}, None),
           'imagefolder_no_test': (make_imagefolder, {'train', 'val'}, ['train']),
           'list_all_splits': (make_list, {'train', 'val', 'test'}, ['train'])}


def _params(tmp:Path, data:dict, splits:set, stages:list[str]|None=None)->Path:
    "Smoke sizes (the typed defaults, shrunk further); `stages` (None: every stage); the report on the split there is to report on"
    cfg = {'experiment': 'fmt', 'seed': 0, 'device': 'cpu', 'runs_dir': str(tmp/'runs'), 'reports_dir': str(tmp/'reports'),
           'data': {**data, 'root': str(tmp/'data'), 'scan_workers': 1, 'many_threshold': 12, 'few_threshold': 6},
           'train': {'arch': 'test_efficientnet', 'pretrained': False, 'img_size': 32, 'finetune_size': 40, 'epochs': 2,
                     'finetune_epochs': 1, 'bs': 8, 'workers': 0, 'embed_dim': 16},
           'finegrained': {'methods': ['plain', 'dcl'], 'epochs': 1, 'img_size': 40, 'head_cap': 6, 'dcl_patches': 2},
           'clean': {'iteration': 1, 'allow_aggressive': True},
           'rebalance': {'iteration': 1, 'crt_epochs': 1, 'batch_size': 8, 'head_cap': 8, 'subset_per_class': 4},
           'tta': {'iteration': 1, 'views': 'center', 'enlarge': 1.25, 'compare': [], 'bs': 8, 'workers': 0},
           'ensemble': {'members': ['train:0', 'train:1']},
           'report': {'split': 'test' if 'test' in splits else 'val', 'hires_tag': None}, 'pipeline': {'stages': stages}}
    p = tmp/'params.yaml'
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


@pytest.mark.timeout(600)
@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_each_layout(tmp_path, layout):
    "Each layout indexed with the splits it has and trained on; the CSV layout through every stage"
    make, splits, stages = LAYOUTS[layout]
    p = _params(tmp_path, make(tmp_path/'data'), splits, stages)
    r = subprocess.run([ALIPROD, 'run', str(p), '--in-process'], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, f'{layout}: exit {r.returncode}\n{r.stdout[-5000:]}\n{r.stderr[-5000:]}'
    runs, rep = tmp_path/'runs'/'fmt', tmp_path/'reports'/'fmt'
    idx = pd.read_parquet(runs/'data'/'index.parquet')
    assert set(idx.split) == splits
    if layout == 'csv_no_val':
        n_test = sum(HELD for _ in COUNTS)
        assert (idx.split == 'val').sum() == n_test // 2 and (idx.split == 'test').sum() == n_test // 2, 'half of every class of test is val'
        assert (idx[idx.split == 'val'].groupby('label').size() == HELD // 2).all()
        assert 'become val' in r.stdout
    # the model trained on the layout's images predicts every split there is, and no other
    assert {f.stem for f in (runs/'train'/'0'/'predictions').glob('*.parquet')} == splits
    for s in {'val', 'test'} - splits:
        assert not list(runs.glob(f'**/predictions/{s}.parquet')), f'no {s} split: nothing may predict one'
    # the per-epoch progress lines a user watches
    assert 'epoch 1/3' in r.stdout and ('val mean class error' in r.stdout) == ('val' in splits), r.stdout[-3000:]
    if stages is not None: return
    # every stage wrote its outputs: the index of round 1, the heads, the system, the report
    clean1 = pd.read_parquet(runs/'clean'/'1'/'index.parquet')   # round 1 cleans training rows only, never adds one
    assert set(clean1.row) <= set(idx.row), 'clean invented rows'
    assert set(clean1.loc[clean1.split != 'train', 'row']) == set(idx.loc[idx.split != 'train', 'row']), 'clean touched val/test'
    assert json.loads((runs/'system'/'manifest.json').read_text())['stage'] == 'system'
    page = (rep/'index.html').read_text()
    where = 'test' if 'test' in splits else 'val'
    assert 'Final system: mean class error' in page and f'reporting images of the {where} split' in page, \
        f'{layout}: the report must open with the final system on {where}'
