"End-to-end tests of the data stage (aliprod.data): generation statistics, determinism, skipping, real-data readers through prepare_data"
import hashlib, json, os, shutil, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
from aliprod.config import ExperimentParams, ParamsError
from aliprod.data import (DataParams, QUARANTINE_COLUMNS, QUARANTINE_REASONS, INDEX_COLUMNS, CLASSES_COLUMNS, split_class_counts, dataset_info, load_index, prepare_data)
from aliprod.images import ImageIndexDataset, write_bad_images, load_rgb
from aliprod.synthetic import synthetic_index

def _exp(tmp_path, name='t', seed=0):
    return ExperimentParams(experiment=name, seed=seed, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))

def _tree_hash(d:Path)->str:
    h = hashlib.sha256()
    for f in sorted(d.rglob('*')):
        if f.is_file(): h.update(f.relative_to(d).as_posix().encode() + b'\0' + f.read_bytes())
    return h.hexdigest()

# a mid-size configuration: big enough that rates and ratios are meaningful, small enough for seconds
MID = dict(n_classes=30, family_size=5, max_per_class=120, min_per_class=4, val_per_class=4, test_per_class=4, img_size=32, img_size_max=40,
           sibling_noise=0.15, uniform_noise=0.07, ood_noise=0.04)

def test_generated_statistics_match_request(tmp_path):
    p = DataParams(**MID)
    prepare_data(_exp(tmp_path), p)
    idx = load_index(_exp(tmp_path))
    tr = idx[idx.split == 'train']
    n = len(tr)
    counts = split_class_counts(idx, p.n_classes)
    assert counts.max() == 120 and counts.min() == 4                       # imbalance 30 exactly (given labels)
    expected = np.sort(np.rint(120 * (4 / 120) ** (np.arange(30) / 29)))[::-1]
    assert np.array_equal(np.sort(counts)[::-1], expected), 'exponential profile'
    for kind, rate in [('sibling', 0.15), ('uniform', 0.07), ('ood', 0.04)]:
        assert abs((tr.noise_kind == kind).mean() - rate) <= 0.5 / n + 1e-12, kind
    noisy = tr[tr.noise_kind != 'clean']
    assert (noisy.label != noisy.clean_label).all()
    sib = tr[tr.noise_kind == 'sibling']
    assert (sib.coarse_label == sib.clean_label // 5).all(), 'sibling content stays inside the labelled family'
    assert (tr[tr.noise_kind == 'ood'].clean_label == -1).all()
    clean = tr[tr.noise_kind == 'clean']; assert (clean.label == clean.clean_label).all()
    for s in ('val', 'test'):
        e = idx[idx.split == s]
        assert (e.noise_kind == 'clean').all() and (e.label == e.clean_label).all()
        assert split_class_counts(idx, 30, s).tolist() == [4] * 30
    # the report quotes the same numbers
    summ = pd.read_csv(tmp_path/'reports'/'t'/'data_summary.csv').set_index('metric')['value']
    assert float(summ['imbalance ratio (max/min train)']) == 30.0
    assert abs(float(summ['sibling noise rate (train)']) - 0.15) < 1e-3
    assert dataset_info(_exp(tmp_path))['num_classes'] == 30

def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    p = DataParams(**MID)
    arts = [prepare_data(_exp(tmp_path, n, seed), p) for n, seed in (('a', 0), ('b', 0), ('c', 1))]
    ib = [Path(a.index).read_bytes() for a in arts]
    assert ib[0] == ib[1], 'same seed must give a byte-identical index parquet'
    assert ib[0] != ib[2]
    trees = [_tree_hash(a.root) for a in arts]
    assert trees[0] == trees[1], 'same seed must give byte-identical images'
    assert trees[0] != trees[2]

def test_prepare_data_skips_only_when_current(tmp_path, capsys):
    exp, p = _exp(tmp_path), DataParams()
    arts = prepare_data(exp, p)
    m1 = json.loads(arts.manifest.read_text())
    capsys.readouterr()
    prepare_data(exp, DataParams())
    assert 'up to date; skipping' in capsys.readouterr().out
    assert json.loads(arts.manifest.read_text())['finished'] == m1['finished']
    prepare_data(exp, DataParams(uniform_noise=0.1))                         # a parameter changed: rerun
    out = capsys.readouterr().out
    assert 'parameters changed: uniform_noise' in out and 'up to date' not in out
    assert (load_index(exp).noise_kind == 'uniform').mean() > 0
    prepare_data(_exp(tmp_path, seed=5), DataParams(uniform_noise=0.1))     # the seed changes synthetic data: rerun
    assert 'parameters changed: seed' in capsys.readouterr().out
    victim = next(arts.root.rglob('*.jpg')); victim.unlink()                 # an output image deleted: rerun
    prepare_data(_exp(tmp_path, seed=5), DataParams(uniform_noise=0.1))
    assert 'data: indexing synthetic data' in capsys.readouterr().out and victim.exists()
    shutil.rmtree(tmp_path/'reports')                                        # reports deleted: rewritten without rerunning
    prepare_data(_exp(tmp_path, seed=5), DataParams(uniform_noise=0.1))
    assert 'up to date' in capsys.readouterr().out
    assert (tmp_path/'reports'/'t'/'class_distribution.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summ = pd.read_csv(tmp_path/'reports'/'t'/'data_summary.csv').set_index('metric')['value']
    assert int(summ['train images']) == int((load_index(_exp(tmp_path, seed=5)).split == 'train').sum())

def _imagefolder_with_bad_files(root:Path):
    "An ImageFolder tree holding good images, every broken kind and every fixable kind; return (n input files, expected reasons)"
    for i, (split, cls) in enumerate([('train', 'cat'), ('train', 'cat'), ('train', 'dog'), ('val', 'cat'), ('val', 'dog')]):
        d = root/split/cls; d.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (24, 20), (40 * i, 100, 200)).save(d/f'good{i}.jpg')
    expected = write_bad_images(root/'train'/'dog')
    del expected['missing.jpg']                                              # a tree cannot list a missing file
    outside = root.parent/'outside.jpg'; Image.new('RGB', (8, 8)).save(outside)
    (root/'train'/'dog'/'link.jpg').symlink_to(outside); expected['link.jpg'] = 'outside_root'
    (root/'train'/'dog'/'readme.txt').write_text('not an image'); expected['readme.txt'] = 'unsupported_extension'
    return 5 + len(expected), expected

def test_imagefolder_end_to_end_every_row_accounted(tmp_path):
    root = tmp_path/'data'
    n_in, expected = _imagefolder_with_bad_files(root)
    exp = _exp(tmp_path)
    arts = prepare_data(exp, DataParams(source='imagefolder', root=str(root), max_pixels=10_000_000, scan_workers=2))
    idx, q, conv = load_index(exp), pd.read_parquet(arts.quarantine), pd.read_parquet(arts.conversions)
    assert len(idx) + len(q) == n_in, 'every input file ends in the index or the quarantine'
    assert idx.columns.tolist() == [*INDEX_COLUMNS, 'role'] and q.columns.tolist() == list(QUARANTINE_COLUMNS)   # role: the data stage's
    assert idx.row.tolist() == list(range(len(idx)))
    reasons = {Path(p).name: r for p, r in zip(q.path, q.reason)}
    bad = {k: v for k, v in expected.items() if v in ('truncated', 'zero_byte', 'undecodable', 'too_large', 'outside_root', 'unsupported_extension')}
    assert reasons == bad
    fixable = {k: v for k, v in expected.items() if k not in bad and v}
    assert {Path(p).name: c for p, c in zip(conv.path, conv.conversion)} == fixable
    assert set(conv.row) <= set(idx.row) and (idx.set_index('row').loc[conv.row, 'path'].to_numpy() == conv.path.to_numpy()).all()
    for pth in idx.path: assert load_rgb(arts.root/pth).mode == 'RGB'
    cls = pd.read_parquet(arts.classes)
    assert cls.columns.tolist() == CLASSES_COLUMNS and cls.class_name.tolist() == ['cat', 'dog']
    md = (tmp_path/'reports'/'t'/'quarantine.md').read_text()
    assert 'truncated.jpg' in md and 'too_large' in md
    summ = pd.read_csv(tmp_path/'reports'/'t'/'data_summary.csv').set_index('metric')['value']
    assert int(summ['quarantined images']) == len(q) and int(summ['converted to RGB']) == len(conv)
    # every reason with its count, in the validation table, quarantine_reasons.csv and quarantine.csv
    counts = q.reason.value_counts()
    for r in QUARANTINE_REASONS: assert int(summ[f'quarantined: {r}']) == counts.get(r, 0), r
    rc = pd.read_csv(tmp_path/'reports'/'t'/'quarantine_reasons.csv').set_index('reason')['count']
    assert rc.index.tolist() == list(QUARANTINE_REASONS) and rc.sum() == len(q) and (rc[rc > 0] == counts.reindex(rc[rc > 0].index)).all()
    qc = pd.read_csv(tmp_path/'reports'/'t'/'quarantine.csv')
    assert len(qc) == len(q) and (qc.reason_count == qc.reason.map(counts)).all() and qc.reason.is_monotonic_increasing
    assert 'reason | count | meaning' in md

def test_csv_and_list_and_json_through_prepare_data(tmp_path):
    root = tmp_path/'data'
    for p in ['a/1.jpg', 'a/2.jpg', 'b/3.jpg', 'train/00001/x.jpg', 'train/00004/y.jpg', 'val/00004/z.jpg']:
        (root/p).parent.mkdir(parents=True, exist_ok=True); Image.new('RGB', (16, 16)).save(root/p)
    (root/'idx.csv').write_text('path,label,split\na/1.jpg,0,train\na/2.jpg,1,train\nb/3.jpg,1,val\na/missing.jpg,0,train\n../up.jpg,0,train\n')
    exp = _exp(tmp_path, 'csv')
    arts = prepare_data(exp, DataParams(source='csv', root=str(root), train_file='idx.csv'))
    idx, q = load_index(exp), pd.read_parquet(arts.quarantine)
    assert idx.path.tolist() == ['a/1.jpg', 'a/2.jpg', 'b/3.jpg'] and dict(zip(q.path, q.reason)) == {'a/missing.jpg': 'missing', '../up.jpg': 'outside_root'}
    (root/'train.txt').write_text('a/1.jpg 0\na/2.jpg,1\n/etc/passwd 0\n')
    exp = _exp(tmp_path, 'list')
    prepare_data(exp, DataParams(source='list', root=str(root), train_file='train.txt'))
    assert load_index(exp).path.tolist() == ['a/1.jpg', 'a/2.jpg']
    (root/'train.json').write_text(json.dumps({'images': [{'class_id': '00004', 'image_id': 'y.jpg'}, {'class_id': '00001', 'image_id': 'x.jpg'}]}))
    (root/'val.json').write_text(json.dumps({'images': [{'class_id': '00004', 'image_id': 'z.jpg'}]}))
    exp = _exp(tmp_path, 'ali')
    arts = prepare_data(exp, DataParams(source='aliproducts', root=str(root), train_file='train.json', val_file='val.json'))
    idx = load_index(exp)
    assert idx[['path', 'label', 'split', 'class_name']].values.tolist() == [['train/00004/y.jpg', 1, 'train', '00004'], ['train/00001/x.jpg', 0, 'train', '00001'],
                                                                           ['val/00004/z.jpg', 1, 'val', '00004']]
    # editing a source file makes the stage rerun
    m = arts.manifest.stat().st_mtime_ns
    (root/'val.json').write_text(json.dumps({'images': []}))
    prepare_data(exp, DataParams(source='aliproducts', root=str(root), train_file='train.json', val_file='val.json'))
    assert arts.manifest.stat().st_mtime_ns != m and (load_index(exp).split == 'val').sum() == 0

def test_dataset_survives_images_vanishing_mid_epoch(tmp_path):
    exp = _exp(tmp_path)
    arts = prepare_data(exp, DataParams())
    idx = load_index(exp)
    gone = idx.path.iloc[[3, 4, 50]].tolist()
    for pth in gone: (arts.root/pth).unlink()
    (arts.root/idx.path.iloc[7]).write_bytes(b'garbage')
    ds = ImageIndexDataset(idx, arts.root, transform=lambda im: torch.zeros(3, 8, 8), failure_log=tmp_path/'failures.jsonl')
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    n = sum(len(y) for _, y in dl)
    assert n == len(idx)
    assert sorted(r for r, _, _ in ds.failures) == sorted(idx.row.iloc[[3, 4, 7, 50]].tolist())
    x, y = ds[3]; assert y == idx.label.iloc[5]                               # deterministic substitute: the next valid row

def test_load_index_iterations(tmp_path):
    exp = _exp(tmp_path)
    with pytest.raises(FileNotFoundError, match='run the data stage first'): load_index(exp)
    with pytest.raises(FileNotFoundError, match='run the clean stage for iteration 1'): load_index(exp, 1)
    d = tmp_path/'runs'/'t'/'clean'/'1'; d.mkdir(parents=True)
    pd.DataFrame({'row': [4, 9], 'label': [0, 1]}).to_parquet(d/'index.parquet')
    assert load_index(exp, 1).row.tolist() == [4, 9]

def test_params_refused_with_key():
    for kw, key in [({'sibling_noise': 0.6, 'uniform_noise': 0.3, 'ood_noise': 0.2}, 'data.sibling_noise'), ({'uniform_noise': 1.5}, 'data.uniform_noise'),
                    ({'min_per_class': 0}, 'data.min_per_class'), ({'img_size': 64, 'img_size_max': 32}, 'data.img_size_max'),
                    ({'source': 'imagefolder'}, 'data.root')]:
        with pytest.raises(ParamsError, match=key): DataParams(**kw)

def test_synthetic_index_full_scale():
    si = synthetic_index()
    assert len(si) == 2_500_000 and si.columns.tolist() == list(INDEX_COLUMNS)
    c = split_class_counts(si, 50_030)
    assert c.max() == 1600 and c.min() == 1 and (c > 0).all()
    tr = si[si.split == 'train']
    assert abs((tr.noise_kind != 'clean').mean() - 0.1) < 1e-3
    assert si.row.is_unique and si.path.is_unique

def _jpeg(path:Path, color=(120, 30, 30), size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True); Image.new('RGB', size, color).save(path, quality=90)

def test_phantom_classes_do_not_shift_labels(tmp_path):
    "class ids only on quarantined records (absolute-path class_id, integer class_id whose file is under 00003/) are no classes"
    root = tmp_path/'data'
    for c, n in (('00000', 3), ('00001', 2), ('00003', 1)):
        for i in range(n): _jpeg(root/'train'/c/f'{i}.jpg')
    _jpeg(root/'val'/'00000'/'v.jpg')
    recs = [{'class_id': c, 'image_id': f'{i}.jpg'} for c, n in (('00000', 3), ('00001', 2), ('00003', 1)) for i in range(n)]
    recs += [{'class_id': '/abs', 'image_id': '0.jpg'}, {'class_id': 3, 'image_id': '0.jpg'}, {'class_id': '00002', 'image_id': 'gone.jpg'}]
    (root/'train.json').write_text(json.dumps({'images': recs}))
    (root/'val.json').write_text(json.dumps({'images': [{'class_id': '00000', 'image_id': 'v.jpg'}]}))
    exp = _exp(tmp_path)
    arts = prepare_data(exp, DataParams(source='aliproducts', root=str(root), train_file='train.json', val_file='val.json'))
    cls, idx, q = pd.read_parquet(arts.classes), load_index(exp), pd.read_parquet(arts.quarantine)
    assert cls.class_name.tolist() == ['00000', '00001', '00003'] and cls.label.tolist() == [0, 1, 2]
    assert (cls.n_train > 0).all() and dataset_info(exp)['num_classes'] == 3
    assert idx[idx.path.str.contains('/00000/')].label.eq(0).all()      # 00000 is label 0, not 1
    assert len(idx) + len(q) == len(recs) + 1
    ph = pd.read_parquet(arts.phantom_classes).set_index('class_name')
    assert sorted(ph.index) == ['/abs', '00002', '3'] and (ph.action == 'not a class (no kept image)').all()
    assert ph.loc['00002', 'reasons'] == 'missing: 1' and ph.loc['3', 'reasons'] == 'missing: 1'
    assert q.label.isna().sum() == 3                                      # quarantined phantom records carry no label
    summ = pd.read_csv(tmp_path/'reports'/'t'/'data_summary.csv').set_index('metric')['value']
    assert int(summ['class ids seen only on quarantined records (not classes)']) == 3
    from aliprod.escape import read_csv_safe
    phc = read_csv_safe(tmp_path/'reports'/'t'/'phantom_classes.csv', dtype={'class_name': str})
    assert sorted(phc['class_name']) == ['/abs', '00002', '3'] and (phc['action'] == 'not a class (no kept image)').all()

def test_failure_log_survives_newline_and_tab_in_names(tmp_path):
    "a valid image named new\\nline.jpg (and one with a tab) that breaks after the scan: failures come back intact from DataLoader workers"
    root = tmp_path/'data'
    names = ['a.jpg', 'new\nline.jpg', 'tab\there.jpg', 'b.jpg']
    for i, n in enumerate(names): _jpeg(root/'train'/'c'/n, (60 * i, 10, 10))
    exp = _exp(tmp_path)
    arts = prepare_data(exp, DataParams(source='imagefolder', root=str(root)))
    idx = load_index(exp)
    assert sorted(Path(p).name for p in idx.path) == sorted(names)           # the scan keeps them: they are valid
    for n in names[1:3]: (root/'train'/'c'/n).write_bytes(b'\xff\xd8 corrupted after the scan')
    ds = ImageIndexDataset(idx, arts.root, transform=lambda im: torch.zeros(3, 4, 4), failure_log=tmp_path/'failures.jsonl')
    n = sum(len(y) for _, y in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert n == len(idx)
    got = {Path(p).name: (r, e) for r, p, e in ds.failures}
    assert sorted(got) == sorted(names[1:3])
    assert {r for r, _ in got.values()} == set(idx[idx.path.str.contains('\n|\t')].row)
    assert all(json.loads(l)['path'] in idx.path.tolist() for l in (tmp_path/'failures.jsonl').read_text().splitlines())

_MOVED = '''
import sys, json
from aliprod.config import ExperimentParams
from aliprod.data import DataParams, prepare_data, load_index, data_root, dataset_info, data_artifacts
from aliprod.images import ImageIndexDataset
for source in ('imagefolder', 'synthetic'):
    e = ExperimentParams(experiment=source, runs_dir='runs', reports_dir='reports')
    arts = prepare_data(e, DataParams(source=source, **({'root': 'data'} if source == 'imagefolder' else {})))
    ds = ImageIndexDataset(load_index(e), data_root(e))
    [ds[i] for i in range(len(ds))]
    print(json.dumps({'source': source, 'root': str(data_root(e)), 'info_root': dataset_info(e)['root'], 'arts_root': str(arts.root),
                      'failures': len(ds.failures), 'n': len(ds), 'stored': json.loads(arts.dataset_json.read_text())['root']}))
'''

def test_moved_project_finds_its_images(tmp_path):
    "dataset.json names the root relative to the project (real data) or to itself (synthetic): a copied project, the original deleted, still loads every image"
    import subprocess, sys
    proj = tmp_path/'proj'
    proj.mkdir(); (proj/'pyproject.toml').write_text('[tool.nbdev]\nlib_name = "aliprod"\n')
    for i, p in enumerate(['train/cat/1.jpg', 'train/cat/2.jpg', 'train/dog/3.jpg', 'val/dog/4.jpg']): _jpeg(proj/'data'/p, (50 * i, 0, 0))
    env = {**{k: v for k, v in os.environ.items() if k != 'ALIPROD_ROOT'}, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    def run(where):
        r = subprocess.run([sys.executable, '-c', _MOVED], cwd=where, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout, [json.loads(l) for l in r.stdout.splitlines() if l.startswith('{')]
    _, first = run(proj)
    assert [f['stored'] for f in first] == ['data', 'images']                 # relative, not /tmp/.../proj/data
    moved = tmp_path/'elsewhere'
    shutil.copytree(proj, moved, symlinks=True); shutil.rmtree(proj)
    out, again = run(moved)
    assert out.count('up to date') == 2, out                                  # the data stage does not rerun after the move
    for f in again:
        assert f['failures'] == 0 and f['n'] > 0
        assert Path(f['root']).is_relative_to(moved.resolve()) and f['root'] == f['info_root'] == f['arts_root']

def _bad_kinds(tmp_path):
    d = tmp_path/'imgs'; expected = write_bad_images(d)
    return d, expected

def test_header_then_garbage_is_undecodable_not_truncated(tmp_path):
    from aliprod.images import check_image
    d, expected = _bad_kinds(tmp_path)
    assert check_image(d/'header_garbage.jpg')[0] == 'undecodable' and check_image(d/'truncated.jpg')[0] == 'truncated'
    jpg = (d/'truncated.jpg').read_bytes()
    (d/'soi_text.jpg').write_bytes(jpg[:4] + b'garbage ' * 200)                # the other shape: magic, then text
    assert check_image(d/'soi_text.jpg')[0] == 'undecodable'

def test_16bit_rgb_png_counted_as_conversion(tmp_path):
    from aliprod.data import scan_images
    d, expected = _bad_kinds(tmp_path)
    idx = pd.DataFrame({'row': [0, 1], 'path': ['rgb16.png', 'ok.png'], 'label': 0, 'split': 'train'})
    kept, q, conv = scan_images(idx, d, workers=1)
    assert len(kept) == 2 and conv.path.tolist() == ['rgb16.png'] and conv.conversion.tolist() == ['high bit depth reduced to 8 bits']
    assert load_rgb(d/'rgb16.png').getpixel((0, 0)) == (255, 0, 128)

def test_max_pixels_above_pil_limit_is_honoured(tmp_path):
    from aliprod.data import scan_images
    Image.new('1', (9500, 9500)).save(tmp_path/'big.png')                     # 90.25M pixels > PIL's 89.5M
    Image.new('RGB', (8, 8)).save(tmp_path/'ok.png')
    idx = pd.DataFrame({'row': [0, 1], 'path': ['big.png', 'ok.png'], 'label': 0, 'split': 'train'})
    for workers in (1, 2):
        kept, q, _ = scan_images(idx, tmp_path, max_pixels=100_000_000, workers=workers, chunk=1)
        assert kept.path.tolist() == ['big.png', 'ok.png'] and len(q) == 0, workers
        kept, q, _ = scan_images(idx, tmp_path, max_pixels=50_000_000, workers=workers, chunk=1)
        assert q.reason.tolist() == ['too_large'], workers
    assert load_rgb(tmp_path/'ok.png', max_pixels=100_000_000).size == (8, 8)
    assert Image.MAX_IMAGE_PIXELS == 89478485                                  # the process-wide limit is untouched

def test_absolute_image_id_is_outside_root_and_force_rescans_fixed_image(tmp_path):
    root = tmp_path/'data'
    _jpeg(root/'train'/'00000'/'a.jpg'); _jpeg(root/'train'/'00000'/'b.jpg')
    (root/'train'/'00000'/'fixme.jpg').write_bytes(b'not yet')
    outside = tmp_path/'secret.jpg'; _jpeg(outside)
    (root/'train.json').write_text(json.dumps({'images': [{'class_id': '00000', 'image_id': 'a.jpg'}, {'class_id': '00000', 'image_id': 'b.jpg'},
                                                          {'class_id': '00000', 'image_id': str(outside)}, {'class_id': '00000', 'image_id': 'fixme.jpg'}]}))
    exp, p = _exp(tmp_path), DataParams(source='aliproducts', root=str(root), train_file='train.json')
    arts = prepare_data(exp, p)
    q = pd.read_parquet(arts.quarantine).set_index('path')
    assert q.loc[str(outside), 'reason'] == 'outside_root' and 'absolute path' in q.loc[str(outside), 'detail']
    assert q.loc['train/00000/fixme.jpg', 'reason'] == 'undecodable'
    _jpeg(root/'train'/'00000'/'fixme.jpg')                                    # the user fixes the image in place
    prepare_data(exp, p)
    assert len(load_index(exp)) == 2                                           # up to date: image files are not in the key
    prepare_data(exp, p, force=True)
    assert sorted(load_index(exp).path) == ['train/00000/a.jpg', 'train/00000/b.jpg', 'train/00000/fixme.jpg']

@pytest.mark.parametrize('content,says', [
    (b'not json at all', 'is not valid JSON'), (b'{"imgs": []}', "has no 'images' key (found 'imgs')"),
    (b'[{"class_id": "0", "image_id": "a.jpg"}]', 'holds a JSON list at the top'), (b'', 'is empty'), (b'  \n', 'is empty'),
    (b'{"images": 3}', "'images' is a JSON int"), (b'\xff\xfe\x00{', 'is not UTF-8 text')])
def test_malformed_aliproducts_json_is_one_line_params_error(tmp_path, content, says):
    root = tmp_path/'data'; root.mkdir(); (root/'train.json').write_bytes(content)
    with pytest.raises(ParamsError) as e:
        prepare_data(_exp(tmp_path), DataParams(source='aliproducts', root=str(root), train_file='train.json'))
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith('data.train_file: ') and str(root/'train.json') in msg and says in msg, msg

def test_bom_and_malformed_csv_and_list(tmp_path):
    root = tmp_path/'data'; _jpeg(root/'a'/'1.jpg'); _jpeg(root/'a'/'2.jpg')
    (root/'train.json').write_bytes(b'\xef\xbb\xbf' + json.dumps({'images': [{'class_id': 'a', 'image_id': '1.jpg'}]}).encode())
    _jpeg(root/'train'/'a'/'1.jpg')
    prepare_data(_exp(tmp_path, 'bom'), DataParams(source='aliproducts', root=str(root), train_file='train.json'))
    assert len(load_index(_exp(tmp_path, 'bom'))) == 1                        # a UTF-8 BOM is read, not refused
    (root/'bom.csv').write_bytes(b'\xef\xbb\xbfpath,label\na/1.jpg,0\n')
    prepare_data(_exp(tmp_path, 'csv'), DataParams(source='csv', root=str(root), train_file='bom.csv'))
    assert load_index(_exp(tmp_path, 'csv')).path.tolist() == ['a/1.jpg']
    for name, content, key, says in [('e.csv', b'', 'train_file', 'is empty'), ('nolab.csv', b'file,y\na,1\n', 'train_file', 'lacks column(s) label, path'),
                                     ('bin.txt', b'\x89PNG\r\n\x1a\n\x00\xff', 'val_file', 'is not UTF-8 text'), ('e.txt', b'', 'train_file', 'is empty')]:
        (root/name).write_bytes(content)
        source = 'csv' if name.endswith('.csv') else 'list'
        with pytest.raises(ParamsError, match=f'data.{key}: .*{name} {says}'.replace('(', r'\(').replace(')', r'\)')):
            prepare_data(_exp(tmp_path, name.replace('.', '_')), DataParams(source=source, root=str(root), **{key: name}))
    with pytest.raises(ParamsError, match='data.classes_file: classes file .*nope.txt not found'):
        prepare_data(_exp(tmp_path, 'x'), DataParams(source='csv', root=str(root), train_file='bom.csv', classes_file='nope.txt'))

def test_params_values_refused_with_the_fix():
    from aliprod.data import check_splits
    for kw, says in [({'sibling_noise': 1.5}, 'data.sibling_noise: must be in [0, 1), got 1.5'), ({'ood_noise': -0.1}, 'data.ood_noise'),
                     ({'sibling_noise': 0.5, 'uniform_noise': 0.5}, 'must be < 1'), ({'n_classes': 0}, 'data.n_classes: must be >= 1'),
                     ({'max_per_class': 0, 'min_per_class': 1}, 'data.max_per_class'), ({'max_pixels': 0}, 'data.max_pixels'),
                     ({'scan_workers': 0}, 'data.scan_workers'), ({'few_threshold': -1}, 'data.few_threshold'),
                     ({'few_threshold': 50, 'many_threshold': 10}, 'few_threshold=50 > many_threshold=10'), ({'many_threshold': 0, 'few_threshold': 0}, 'data.many_threshold'),
                     ({'source': 'aliproduct'}, "Did you mean 'aliproducts'?"), ({'source': 'csv', 'root': ''}, 'data.root: must be a path')]:
        with pytest.raises(ParamsError, match=None) as e: DataParams(**kw)
        assert says in str(e.value), (kw, str(e.value))
    with pytest.raises(ParamsError) as e: check_splits(['train', 'tset'], '[train] eval_splits')
    assert str(e.value) == "[train] eval_splits: Unknown split 'tset'; valid: train, val, test. Did you mean 'test'?"

def test_scan_speed_benchmark_small(tmp_path):
    "benchmarks/scan_speed.py at a tiny size: runs, writes its JSON, and the fast scan catches every bad kind the full decode does"
    import subprocess, sys
    root = Path(__file__).resolve().parents[1]
    out = tmp_path/'scan_speed.json'
    r = subprocess.run([sys.executable, str(root/'benchmarks'/'scan_speed.py'), '--n', '6', '--size', '96', '--repeats', '1', '--workers', '2', '--out', str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res['per_core']) == {'pil_open_load', 'pil_verify', 'scan_full', 'scan'} and all(v > 0 for v in res['per_core'].values())
    assert res['battery_all_caught'] and res['battery']['photo_truncated.jpg']['fast'] == 'truncated'
    assert res['pool']['workers'] == 2 and res['aliproducts_16_cores_extrapolated_min'] > 0 and 'images/s' in r.stdout

def test_aliproducts_battery_every_record_accounted(tmp_path):
    "One AliProducts-JSON set holding every bad kind: each record indexed or quarantined with its reason, convertible images counted, no phantom label"
    root = tmp_path/'data'; cdir = root/'train'/'00000'
    expected = write_bad_images(cdir)                                           # broken and convertible kinds (missing.jpg is not written)
    for i in range(4): _jpeg(cdir/f'good{i}.jpg', (30 * i, 90, 20))
    Image.new('RGB', (1, 1), (9, 9, 9)).save(cdir/'one.png'); expected['one.png'] = ''
    outside = tmp_path/'outside.jpg'; _jpeg(outside); (cdir/'link.jpg').symlink_to(outside); expected['link.jpg'] = 'outside_root'
    _jpeg(root/'train'/'00001'/'a.jpg'); _jpeg(root/'val'/'00001'/'v.jpg')
    (root/'train'/'00002').mkdir(); (root/'train'/'00002'/'t.jpg').write_bytes((cdir/'truncated.jpg').read_bytes())  # a class whose only image is broken
    recs = [{'class_id': '00000', 'image_id': n} for n in [*expected, *(f'good{i}.jpg' for i in range(4))]]
    recs += [{'class_id': '00001', 'image_id': 'a.jpg'}, {'class_id': '00002', 'image_id': 't.jpg'},
             {'class_id': '00000', 'image_id': 'good0.jpg'},                                  # duplicate
             {'class_id': '00000', 'image_id': '../00001/a.jpg'}, {'class_id': '00000', 'image_id': str(outside)},  # .. and absolute
             {'class_id': 3, 'image_id': 'good1.jpg'}, {'class_id': '../../x', 'image_id': 'good1.jpg'},      # integer and path-like class ids
             {'class_id': '00000'}, {'image_id': 'good2.jpg'}, 'not a record']                # bad records
    (root/'train.json').write_text(json.dumps({'images': recs}))
    (root/'val.json').write_text(json.dumps({'images': [{'class_id': '00001', 'image_id': 'v.jpg'}]}))
    exp = _exp(tmp_path)
    arts = prepare_data(exp, DataParams(source='aliproducts', root=str(root), train_file='train.json', val_file='val.json', max_pixels=10_000_000))
    idx, q, conv, cls = load_index(exp), pd.read_parquet(arts.quarantine), pd.read_parquet(arts.conversions), pd.read_parquet(arts.classes)
    assert len(idx) + len(q) == len(recs) + 1
    why = dict(zip(q.path, q.reason))
    for n, want in expected.items():
        if want in ('truncated', 'zero_byte', 'undecodable', 'too_large', 'outside_root', 'missing'): assert why[f'train/00000/{n}'] == want, n
        else: assert f'train/00000/{n}' in set(idx.path), n
    assert why['../00001/a.jpg'] == 'outside_root' and why[str(outside)] == 'outside_root' and why['train/00000/good0.jpg'] == 'duplicate_path'
    assert why['train/3/good1.jpg'] == 'missing' and why['good1.jpg'] == 'outside_root' and why['train/00002/t.jpg'] == 'truncated'
    assert (q.reason == 'bad_record').sum() == 3
    assert {Path(p).name: c for p, c in zip(conv.path, conv.conversion)} == {k: v for k, v in expected.items() if v and v not in QUARANTINE_REASONS}
    assert cls.class_name.tolist() == ['00000', '00001'] and (cls.n_train > 0).all()              # 00002, 3, ../../x are no classes
    assert sorted(pd.read_parquet(arts.phantom_classes).class_name) == ['../../x', '00002', '3']
    assert two_runs_identical(tmp_path, root)

def two_runs_identical(tmp_path, root)->bool:
    "Two runs of the same parameters write byte-identical index, classes and quarantine"
    p = DataParams(source='aliproducts', root=str(root), train_file='train.json', val_file='val.json', max_pixels=10_000_000)
    a, b = prepare_data(_exp(tmp_path, 'r1'), p), prepare_data(_exp(tmp_path, 'r2'), p)
    return all(Path(getattr(a, k)).read_bytes() == Path(getattr(b, k)).read_bytes() for k in ('index', 'classes', 'quarantine', 'conversions', 'phantom_classes'))
