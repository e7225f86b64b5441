"Sparse top-k ensembling (aliprod.ensemble): combining members, streaming files, member names, and the stage on a run without a test split"
import json
import numpy as np, pandas as pd, pytest, torch
from aliprod.config import ExperimentParams, ParamsError
from aliprod.rundirs import experiment_dir, report_dir
from aliprod.predictions import TopK, topk_from_probs, write_topk, read_topk
from aliprod.ensemble import combine_topk, ensemble_files, member_file, parse_member, EnsembleParams, run_ensemble

# ---------------------------------------------------------------- ensembling

N, K = 50, 9
LABELS = np.random.default_rng(0).integers(0, K, N)

def member(seed, k, rows=None):
    probs = np.random.default_rng(seed).dirichlet(np.full(K, 0.4), N)
    return topk_from_probs(torch.as_tensor(probs).float(), LABELS, rows=np.arange(N) * 3 if rows is None else rows, k=k)

def dense_topk(parts, weights, mode, k):
    w = np.asarray(weights, float)
    if mode == 'mean': w = w / w.sum()
    d = sum(wi * p.dense().astype(np.float64) for p, wi in zip(parts, w))
    top = np.argsort(-d, axis=1, kind='stable')[:, :k]
    return top, np.take_along_axis(d, top, 1)

def test_ensemble_of_one_is_the_model():
    m = member(1, 4)
    for mode in ('mean', 'sum'):
        e = combine_topk([m], mode=mode)
        np.testing.assert_array_equal(e.topk_labels, m.topk_labels)
        np.testing.assert_allclose(e.topk_probs, m.topk_probs, rtol=1e-6)
        np.testing.assert_allclose(e.p_label, m.p_label, rtol=1e-6)
        np.testing.assert_array_equal(e.rows, m.rows)

@pytest.mark.parametrize('k', [K, 3])
@pytest.mark.parametrize('mode,weights', [('mean', [1, 1, 1]), ('mean', [0.2, 1, 3]), ('sum', [1, 2, 0.5])])
def test_sparse_equals_dense(k, mode, weights):
    parts = [member(s, k) for s in (1, 2, 3)]  # k = K: exact dense averaging; k < K: averaging of the truncated matrices
    e = combine_topk(parts, weights, mode)
    top, val = dense_topk(parts, weights, mode, k)
    np.testing.assert_array_equal(e.topk_labels, top)
    np.testing.assert_allclose(e.topk_probs, val, rtol=1e-5, atol=1e-7)
    w = np.asarray(weights, float); w = w / w.sum() if mode == 'mean' else w
    np.testing.assert_allclose(e.p_label, sum(wi * p.p_label for p, wi in zip(parts, w)), rtol=1e-5)

def test_sum_and_mean_rank_identically():
    parts = [member(s, 4) for s in (1, 2, 3)]
    s, m = combine_topk(parts, mode='sum'), combine_topk(parts, mode='mean')
    np.testing.assert_array_equal(s.topk_labels, m.topk_labels)
    np.testing.assert_allclose(s.topk_probs, 3 * m.topk_probs, rtol=1e-5)

def test_mismatched_rows_are_refused(tmp_path):
    a, b = member(1, 4), member(2, 4)
    with pytest.raises(ValueError, match='covers 49 rows'): combine_topk([a, b.take(slice(1, None))])
    write_topk(tmp_path/'a.parquet', a)
    write_topk(tmp_path/'b_short.parquet', b.take(slice(0, N - 2)))
    write_topk(tmp_path/'b_other.parquet', member(2, 4, rows=np.arange(N) * 3 + 1))
    for bad in ('b_short', 'b_other'):
        with pytest.raises(ValueError, match=bad):
            ensemble_files([tmp_path/'a.parquet', tmp_path/f'{bad}.parquet'], tmp_path/'e.parquet')
    assert not (tmp_path/'e.parquet').exists()

def test_streaming_files_equals_in_memory(tmp_path):
    parts = [member(s, 5) for s in (1, 2)]
    write_topk(tmp_path/'a.parquet', parts[0], batch_rows=7)
    write_topk(tmp_path/'b.parquet', parts[1].take(np.random.default_rng(3).permutation(N)), batch_rows=11)  # another row order
    e = read_topk(ensemble_files([tmp_path/'a.parquet', tmp_path/'b.parquet'], tmp_path/'e.parquet', [1, 3], 'sum', chunk_rows=8))
    r = combine_topk(parts, [1, 3], 'sum')
    np.testing.assert_array_equal(e.rows, r.rows); np.testing.assert_array_equal(e.topk_labels, r.topk_labels)
    np.testing.assert_allclose(e.topk_probs, r.topk_probs, rtol=1e-6)

def test_member_syntax(tmp_path):
    exp = ExperimentParams(experiment='m', runs_dir=str(tmp_path))
    b = tmp_path/'m'
    assert member_file('train:b:2', exp, 'val') == b/'train-b/2/predictions/val.parquet'
    assert member_file('tta:ten-x1.5', exp, 'test', 1) == b/'tta/1/ten-x1.5/test.parquet'
    assert member_file('rebalance:crt:0', exp, 'val') == b/'rebalance/0/crt/predictions/val.parquet'
    assert member_file('elsewhere/{split}.parquet', exp, 'val') == b/'elsewhere/val.parquet'
    with pytest.raises(ParamsError, match='needs a name'): parse_member('tta')
    with pytest.raises(ParamsError, match='weights has 1'): EnsembleParams(members=['train', 'tta:ten-x1.5'], weights=[1.0])


# ---------------------------------------------------------------- the stage, on a run directory without a test split

def fake_run(tmp, splits=('train', 'val'), K=6, n=30, experiment='t'):
    "A run directory with the data stage's index, class sizes and shot thresholds, and members `train` and `tta:ten-x1.5` predicting `splits`"
    g = np.random.default_rng(0)
    exp = ExperimentParams(experiment=experiment, runs_dir=str(tmp/'runs'), reports_dir=str(tmp/'reports'))
    base = experiment_dir(exp)
    (base/'data').mkdir(parents=True)
    index = pd.DataFrame({'row': np.arange(n * len(splits)), 'split': np.repeat(splits, n), 'label': g.integers(0, K, n * len(splits))})
    index['clean_label'] = np.where(g.random(len(index)) < 0.8, index['label'], (index['label'] + 1) % K)
    index.to_parquet(base/'data'/'index.parquet')
    counts = np.bincount(index.loc[index['split'] == 'train', 'label'], minlength=K)
    pd.DataFrame({'label': np.arange(K), 'n_train': counts}).to_parquet(base/'data'/'classes.parquet')
    (base/'data'/'dataset.json').write_text(json.dumps({'root': str(tmp), 'num_classes': K, 'many_threshold': 6, 'few_threshold': 4,
                                                        'source': 'aliproducts', 'n_images': len(index), **{f'n_{s}': n * (s in splits) for s in ('train', 'val', 'test')}}))
    for seed, d in ((1, 'train/0/predictions'), (2, 'tta/0/ten-x1.5')):
        (base/d).mkdir(parents=True)
        for s in splits:
            r = index[index['split'] == s]
            probs = torch.as_tensor(np.random.default_rng(seed).dirichlet(np.ones(K), len(r))).float()
            write_topk(base/d/f'{s}.parquet', topk_from_probs(probs, r['label'].to_numpy().copy(), rows=r['row'].to_numpy().copy(), k=4))
    return exp

def test_stage_on_a_run_without_test_split(tmp_path):
    exp = fake_run(tmp_path)
    p = EnsembleParams(name='pair', k=4, members=['train', 'tta:ten-x1.5'], splits=['val'])
    art = run_ensemble(exp, p, 0)
    assert art.ran and set(art.predictions) == {'val'}
    ens, members = read_topk(art.predictions['val']), [read_topk(member_file(m, exp, 'val')) for m in ('train', 'tta:ten-x1.5')]
    assert (ens.rows == members[0].rows).all() and (ens.labels == members[0].labels).all()   # every val image, its label
    assert set(zip(art.table['split'], art.table['labels'])) == {('val', 'given'), ('val', 'clean')}
    assert list(art.table['model'].unique()) == ['ensemble pair (mean)', 'train', 'tta:ten-x1.5']
    # the data stage's thresholds (not evaluate's defaults 100/20) define the shot groups
    assert (art.metrics['val']['many_threshold'], art.metrics['val']['few_threshold']) == (6, 4)
    assert art.member_metrics['train']['val']['few_threshold'] == 4
    from aliprod.escape import read_csv_safe
    csv = read_csv_safe(report_dir(exp)/'ensemble_pair.csv')   # the report's table is the stage's (read back, not only present)
    assert csv['model'].tolist() == art.table['model'].tolist() and np.allclose(csv['mean_class_err'], art.table['mean_class_err'])
    assert (report_dir(exp)/'ensemble_pair.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

def test_rerun_is_a_noop_by_the_manifest(tmp_path):
    exp = fake_run(tmp_path)
    p = EnsembleParams(name='pair', k=4, members=['train', 'tta:ten-x1.5'], splits=['val'])
    first = run_ensemble(exp, p, 0)
    manifest = (first.out_dir/'manifest.json').read_text()
    mtime = first.predictions['val'].stat().st_mtime_ns
    again = run_ensemble(exp, p, 0)
    assert not again.ran and (first.out_dir/'manifest.json').read_text() == manifest
    assert again.predictions['val'].stat().st_mtime_ns == mtime and again.metrics == first.metrics
    assert 'ensemble' in json.loads(manifest)['code']['modules'] and 'metrics' in json.loads(manifest)['code']['modules']  # derived from imports
    # a member that changes makes it run again
    write_topk(member_file('train', exp, 'val'), read_topk(member_file('tta:ten-x1.5', exp, 'val')))
    assert run_ensemble(exp, p, 0).ran

def test_a_split_the_index_lacks_is_refused_before_work(tmp_path):
    exp = fake_run(tmp_path)
    with pytest.raises(ParamsError, match=r"the index has no 'test' split \(it has train, val\); drop 'test' from \[ensemble\] splits"):
        run_ensemble(exp, EnsembleParams(name='e', k=4, members=['train', 'tta:ten-x1.5'], splits=['val', 'test']), 0)
    assert not (experiment_dir(exp)/'ensemble'/'e').exists()

def test_a_split_a_member_lacks_names_member_and_split(tmp_path):
    exp = fake_run(tmp_path, splits=('train', 'val', 'test'))
    member_file('tta:ten-x1.5', exp, 'test').unlink()
    with pytest.raises(FileNotFoundError, match=r"Ensemble member 'tta:ten-x1.5' has no 'test' predictions: .* \(it has train, val\)"):
        run_ensemble(exp, EnsembleParams(name='e', k=4, members=['train', 'tta:ten-x1.5'], splits=['val', 'test']), 0)
    assert not (experiment_dir(exp)/'ensemble'/'e').exists()

def test_an_unlabelled_split_is_combined_not_evaluated(tmp_path):
    exp = fake_run(tmp_path, splits=('train', 'val', 'test'))
    for m in ('train', 'tta:ten-x1.5'):   # test images without labels, as the challenge's test set
        f = member_file(m, exp, 'test'); t = read_topk(f); t.labels[:] = -1; write_topk(f, t)
    art = run_ensemble(exp, EnsembleParams(name='e', k=4, members=['train', 'tta:ten-x1.5'], splits=['val', 'test']), 0)
    assert 'test' not in art.metrics and 'val' in art.metrics
    t = read_topk(art.predictions['test'])   # combined all the same: every test image, still unlabelled
    assert (t.rows == read_topk(member_file('train', exp, 'test')).rows).all() and (t.labels == -1).all()

def test_a_run_without_val_split(tmp_path):
    exp = fake_run(tmp_path, splits=('train', 'test'))
    art = run_ensemble(exp, EnsembleParams(name='e', k=4, members=['train', 'tta:ten-x1.5'], splits=['test']), 0)
    assert set(art.table['split']) == {'test'}
    with pytest.raises(ParamsError, match=r"the index has no 'val' split \(it has test, train\)"):
        run_ensemble(exp, EnsembleParams(name='v', k=4, members=['train', 'tta:ten-x1.5'], splits=['val']), 0)
