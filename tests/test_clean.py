"""Tests of the clean stage (aliprod.clean): rule invariants, tail protection, relabelling, sparse vs dense confident
learning, byte-identical reruns, a round killed (SIGKILL) while writing its index, and the scale benchmark at a small size."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np, pandas as pd, pytest
from aliprod.clean import CleanParams, clean_index, noisy_options
from aliprod.noise import RULES, confident_learning, confident_thresholds, find_noisy, protect_tail, simulate_predictions
from aliprod.predictions import topk_from_probs

ROOT = Path(__file__).resolve().parents[1]


def noisy_index(n=4000, K=50, noise=0.25, seed=0):
    "A long-tailed index with injected sibling / uniform / ood noise and ground truth"
    r = np.random.default_rng(seed)
    c = np.minimum((r.pareto(0.8, n) * 2).astype(int), K - 1)
    kind = np.where(r.random(n) < noise, r.choice(['sibling', 'uniform', 'ood'], n), 'clean')
    y = np.where(kind == 'sibling', (c + 1) % K, np.where(kind == 'uniform', r.integers(0, K, n), c))
    kind = np.where((kind == 'uniform') & (y == c), 'clean', kind)
    return pd.DataFrame({'row': np.arange(n, dtype=np.int64), 'path': [f'train/{i}.jpg' for i in range(n)], 'label': y.astype(np.int32),
                         'split': np.where(np.arange(n) % 5 == 0, 'val', 'train'), 'class_name': [f'c{j}' for j in y],
                         'coarse_label': (y // 5).astype(np.int32), 'clean_label': np.where(kind == 'ood', -1, c).astype(np.int32),
                         'noise_kind': kind})


@pytest.fixture(scope='module')
def data():
    idx = noisy_index()
    tr = idx[idx.split == 'train'].reset_index(drop=True)
    return idx, tr, simulate_predictions(tr, 50, k=5, seed=0)


def _params(rule, **kw):
    return CleanParams(rules=[rule], agreement_tags=['m2'] if rule == 'agreement' else [], **kw)


@pytest.mark.parametrize('rule', RULES)
def test_no_rule_flags_a_confident_top1_label(data, rule):
    _, tr, t = data
    if rule in ('prototype', 'h2e'):   # embeddings near the top-1 class's direction, as a trained model's are
        from aliprod.predictions import TopK
        t = TopK(t.rows, t.labels, t.topk_labels, t.topk_probs, t.p_label, t.num_classes,
                 (np.eye(50)[t.top1] + 0.3 * np.random.default_rng(0).normal(size=(len(t), 50))).astype(np.float32))
    confident_agree = (t.top1 == t.labels) & (t.conf >= 0.5)
    for kw in ({}, {'conf_threshold': 1.0, 'self_conf_threshold': 1.0}, {'drop_fraction': 0.99}):
        p = _params(rule, **kw)
        flags = find_noisy(t, p.rules, others=[t], **noisy_options(p)).reasons.to_numpy() > 0
        assert flags.any(), f'{rule} {kw} flags nothing: the test would be vacuous'
        assert not (flags & confident_agree).any(), f'{rule} {kw} flagged a sample whose label is the confident top-1'
        assert not (flags & (t.top1 == t.labels)).any()


@pytest.mark.parametrize('m', [1, 3, 5, 20])
def test_tail_protection_never_empties_or_shrinks_below_min(data, m):
    idx, tr, t = data
    # the harshest rule: drop 90% of the lowest-confidence disagreements, plus every low-confidence sample
    p = CleanParams(rules=['disagree_low_conf', 'self_confidence'], conf_threshold=1.0, self_conf_threshold=1.0, min_per_class=m)
    new, ch, s = clean_index(idx, t, p)
    n0 = np.bincount(tr.label, minlength=50)
    n1 = np.bincount(new.loc[new.split == 'train', 'label'], minlength=50)
    assert (n1 >= np.minimum(n0, m)).all(), 'a class fell below min_per_class'
    assert ((n1 > 0) == (n0 > 0)).all(), 'tail protection emptied a class'
    # the samples kept by protection are each class's most confident flagged ones
    flagged = find_noisy(t, p.rules, **noisy_options(p)).reasons.to_numpy() > 0
    kept = protect_tail(t.labels, flagged, t.p_label, m, 50, t.rows)
    for c in np.unique(t.labels[flagged & ~kept]):
        saved = t.p_label[flagged & ~kept & (t.labels == c)]
        dropped = t.p_label[kept & (t.labels == c)]
        if len(dropped): assert saved.min() >= dropped.max()


def test_protect_tail_random_cases():
    r = np.random.default_rng(1)
    for _ in range(50):
        n, K, m = int(r.integers(1, 200)), int(r.integers(1, 20)), int(r.integers(0, 8))
        labels = r.integers(0, K, n); flags = r.random(n) < r.random(); p = r.random(n).astype(np.float32)
        out = protect_tail(labels, flags, p, m, K)
        n0 = np.bincount(labels, minlength=K); n1 = np.bincount(labels[~out], minlength=K)
        assert (n1 >= np.minimum(n0, m)).all() and not (out & ~flags).any()
        assert (n1 == np.maximum(n0 - np.bincount(labels[flags], minlength=K), np.minimum(n0, m))).all(), 'protection unflagged more than needed'


def test_relabel_stays_in_class_set(data):
    idx, tr, t = data
    p = CleanParams(rules=['disagree_low_conf', 'confident_learning', 'self_confidence'], action='relabel', relabel_evidence='suggest',
                    relabel_threshold=0.2, self_conf_threshold=0.5, min_per_class=2)
    new, ch, s = clean_index(idx, t, p)
    assert s['relabelled'] > 0
    assert new.label.between(0, 49).all() and set(new.label) <= set(range(50))
    rel = ch[ch.action == 'relabel']
    assert (rel.suggest_prob >= 0.2).all() and (rel.new_label != rel.label).all()
    by_row = new.set_index('row')
    assert (by_row.loc[rel.row, 'label'].to_numpy() == rel.new_label.to_numpy()).all()
    assert (by_row.loc[rel.row, 'class_name'].to_numpy() == np.array([f'c{j}' for j in rel.new_label])).all()
    # a corrupt prediction naming a class outside 0..K-1 is refused, never written
    bad = t.take(np.arange(len(t))); bad.topk_labels = bad.topk_labels.copy(); bad.topk_labels[3, 0] = 57
    with pytest.raises(ValueError, match='outside 0..49'): clean_index(idx, bad, p)


def test_relabelling_is_reachable_with_the_2021_rule(data):
    "disagree_low_conf flags top-1s below conf_threshold: relabelling takes its class from confident learning, and says why the rest are dropped"
    from aliprod.config import ParamsError
    from aliprod.noise import RELABEL_OUTCOMES
    idx, tr, t = data
    with pytest.raises(ParamsError, match="relabel_evidence 'suggest' would relabel none"): CleanParams(action='relabel', relabel_evidence='suggest')
    new, ch, s = clean_index(idx, t, CleanParams(action='relabel', min_per_class=2))
    assert s['relabelled'] > 0 and set(s['relabel_outcomes']) == set(RELABEL_OUTCOMES)
    assert s['relabel_outcomes']['relabelled'] == s['relabelled']
    assert sum(s['relabel_outcomes'].values()) == s['relabelled'] + s['dropped']
    rel = ch[ch.action == 'relabel']
    _, guess = confident_learning(t)
    by_row = dict(zip(t.rows.tolist(), guess.tolist()))
    assert (rel.new_label.to_numpy() == np.array([by_row[r] for r in rel.row])).all(), 'the new class is the confident-learning guess'
    assert set(ch.loc[ch.action == 'drop', 'relabel_outcome']) <= {'no_confident_class', 'evidence_is_label'}
    assert 0 <= s['relabels_recover_clean_label'] <= 1
    # the same flags as with action: drop
    assert s['flagged'] == clean_index(idx, t, CleanParams(min_per_class=2))[2]['flagged']


def test_relabelling_on_the_evidence_of_another_model(data):
    "relabel_evidence 'models': the other models must all predict the suggested class top-1, with mean probability >= relabel_threshold"
    from aliprod.config import ParamsError
    idx, tr, t = data
    other = simulate_predictions(tr, 50, k=5, seed=11)
    with pytest.raises(ParamsError, match='needs agreement_tags'): CleanParams(action='relabel', relabel_evidence='models')
    p = CleanParams(action='relabel', relabel_evidence='models', relabel_threshold=0.5, agreement_tags=['m2'], min_per_class=2)
    new, ch, s = clean_index(idx, t, p, others=[other])
    rel = ch[ch.action == 'relabel']
    o = other.take(np.searchsorted(other.rows, rel.row.to_numpy()))
    assert len(rel) and (o.top1 == rel.new_label.to_numpy()).all() and (o.conf >= 0.5).all()
    assert (rel.new_label.to_numpy() == rel.top1.to_numpy()).all(), 'the new class is the flagging model\'s suggestion, confirmed'
    assert s['relabel_outcomes']['models_disagree'] > 0 and s['relabels_recover_clean_label'] > 0.8
    assert sum(s['relabel_outcomes'].values()) == s['relabelled'] + s['dropped']


def test_unlabelled_rows_pass_through(data):
    "A split without labels (label -1, e.g. AliProducts' test images) is neither cleaned nor dropped; nor are unlabelled training rows"
    idx, tr, t = data
    extra = idx.head(30).assign(row=lambda d: d.row + 100_000, split=['test'] * 15 + ['train'] * 15, label=-1, clean_label=-1)
    new, ch, s = clean_index(pd.concat([idx, extra], ignore_index=True), t, CleanParams(action='relabel', min_per_class=2))
    kept = new.set_index('row').loc[extra.row]
    assert (kept.label == -1).all() and list(kept.split) == list(extra.split)
    assert not ch.row.isin(extra.row).any() and s['train_before'] == len(tr)


def _dense_cl(P, y):
    K = P.shape[1]
    th = np.array([P[y == j, j].mean() if (y == j).any() else np.inf for j in range(K)])
    masked = np.where(P >= th, P, -1.0)
    g = np.where((P >= th).any(1), masked.argmax(1), -1)
    return (g >= 0) & (g != y) & (P.argmax(1) != y), g


@pytest.mark.parametrize('seed', range(5))
def test_sparse_confident_learning_matches_dense(seed):
    r = np.random.default_rng(seed)
    N, K = 400, 15
    P = r.dirichlet(np.full(K, 0.4), N).astype(np.float32)
    y = np.where(r.random(N) < 0.6, P.argmax(1), r.integers(0, K, N))
    df, dg = _dense_cl(P, y)
    sf, sg = confident_learning(topk_from_probs(P, y, k=K))
    assert (sf == df).all() and (sg == dg).all(), 'k = K must equal the dense definition exactly'
    for k in (1, 3, 8):
        sk, _ = confident_learning(topk_from_probs(P, y, k=k))
        assert not (sk & ~df).any(), f'k={k}: sparse flagged what dense does not'
        assert np.allclose(confident_thresholds(topk_from_probs(P, y, k=k)), confident_thresholds(topk_from_probs(P, y, k=K)))


def test_confident_learning_is_not_cleanlabs_global_argmax():
    "cleanlab issue #1248: the guess is the most probable class that clears its threshold, not the global argmax"
    t = topk_from_probs(np.array([[0.1, 0.2, 0.3, 0.4]] * 2), [2, 1], k=4)
    f, g = confident_learning(t, thresholds=np.array([0.01, 0.5, 0.01, 0.5]))
    assert f.tolist() == [False, True] and g.tolist() == [2, 2]


def test_same_parameters_same_bytes(tmp_path, data):
    idx, tr, t = data
    from aliprod.clean import write_index
    src = tmp_path/'index0.parquet'; idx.to_parquet(src, index=False)
    p = CleanParams(rules=['disagree_low_conf', 'confident_learning'], action='relabel', relabel_threshold=0.5)
    outs = []
    for i in range(2):
        new, _, _ = clean_index(pd.read_parquet(src), simulate_predictions(tr, 50, k=5, seed=0), p)
        write_index(new, tmp_path/f'index{i+1}.parquet', src); outs.append((tmp_path/f'index{i+1}.parquet').read_bytes())
    assert outs[0] == outs[1]
    assert src.read_bytes() == (idx.to_parquet(tmp_path/'again.parquet', index=False) or (tmp_path/'again.parquet').read_bytes()), 'input modified'


KILL_SCRIPT = textwrap.dedent('''
    import sys, time, numpy as np, pandas as pd, pyarrow.parquet as pq
    sys.path.insert(0, {tests!r})
    from test_clean import noisy_index
    from aliprod.clean import CleanParams, clean_index, write_index
    from aliprod.noise import simulate_predictions
    idx = noisy_index(); src = {src!r}; idx.to_parquet(src, index=False)
    tr = idx[idx.split == 'train'].reset_index(drop=True)
    new, _, _ = clean_index(idx, simulate_predictions(tr, 50, k=5), CleanParams())
    real = pq.write_table
    def slow_write(table, where, **kw):
        with open(where, 'wb') as f: f.write(b'PAR1' + b'x' * 1000); f.flush()
        print('WRITING', flush=True); time.sleep(60)
    pq.write_table = slow_write
    write_index(new, {dst!r}, src)
''')


def test_killed_round_leaves_no_half_written_index(tmp_path):
    dst = tmp_path/'clean'/'1'/'index.parquet'
    code = KILL_SCRIPT.format(tests=str(Path(__file__).parent), src=str(tmp_path/'index0.parquet'), dst=str(dst))
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert 'WRITING' in line, f'the writer never started: {line!r}'
        os.kill(proc.pid, signal.SIGKILL)  # a kill in the middle of the index write
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None: proc.kill()
    assert not dst.exists(), 'a killed write left a file under the index name'
    assert list(dst.parent.glob('.index.parquet.*.tmp')), 'expected the half-written temp file (the stage removes it on the next run)'


def test_benchmark_small(tmp_path):
    out = tmp_path/'clean_scale.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'clean_scale.py'), '--n-images', '6000', '--n-classes', '300',
                        '--cl-images', '3000', '--cl-classes', '100', '--repeats', '1', '--in-process', '--out', str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {'config', 'hardware', 'data', 'ours', 'cleanlab', 'target'} <= set(res)
    assert [o['rules'] for o in res['ours']] == ['disagree_low_conf', 'self_confidence', 'confident_learning',
                                                'disagree_low_conf+confident_learning', 'agreement', 'class_relative', 'balanced',
                                                'balanced+confident_learning', 'prototype', 'h2e']
    for o in res['ours']: assert set(o['by_band']) == {'many', 'medium', 'few'}
    for o in res['ours']: assert {'median_s', 'peak_rss_mb', 'flagged', 'precision', 'recall', 'f1'} <= set(o)
    methods = [m['method'] for m in res['cleanlab']['methods']]
    assert any('find_label_issues_batched' in m for m in methods) and any(m.startswith('aliprod confident_learning') for m in methods)
    dense = next(m for m in res['cleanlab']['methods'] if m['method'].startswith('dense'))
    assert dense['sparse_subset_of_dense']
    assert {'met', 'median_s', 'peak_rss_mb'} <= set(res['target'])


def test_clean_stage_without_a_test_split(tmp_path):
    "Real AliProducts data has no test labels: the stage cleans from train + val, and its rounds table has no test column"
    from aliprod.config import ExperimentParams, ParamsError
    from aliprod.data import DataParams
    from aliprod.train import TrainParams
    from aliprod.clean import run_clean
    exp = ExperimentParams(experiment='notest', seed=3, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = DataParams(n_classes=5, family_size=5, max_per_class=30, min_per_class=6, val_per_class=3, test_per_class=0,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
    t = TrainParams(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=None, finetune_epochs=0, epochs=1, bs=16, lr=0.05,
                    warmup_epochs=0, milestones=[1], eval_splits=['train', 'val'])
    from aliprod.data import prepare_data
    from aliprod.train import train_round
    prepare_data(exp, data)   # what clean needs (`call_stage('clean')` runs it): the data, then the model of index 0
    with pytest.raises(ParamsError, match='needs the predictions of the training split'):
        run_clean(exp, data, TrainParams(**{**t.__dict__, 'eval_splits': ['val']}), CleanParams())
    assert not (tmp_path/'runs'/'notest'/'train').exists(), 'refused before training'
    train_round(exp, data, t)
    # a 1-epoch model of 5 classes may be near chance (the guard would refuse its round): this test is about the splits
    art = run_clean(exp, data, t, CleanParams(iteration=1, action='relabel', min_per_class=2, allow_aggressive=True))
    assert art.rounds.iteration.tolist() == [0, 1] and art.rounds.val_mean_class_err.notna().all()
    assert not any(c.startswith('test_') for c in art.rounds.columns)
    assert set(art.summary['relabel_outcomes']) and art.summary['relabelled'] + art.summary['dropped'] == sum(art.summary['relabel_outcomes'].values())
    rep = tmp_path/'reports'/'notest'
    for f in ('clean_rounds.csv', 'clean_rounds.md', 'clean_rounds.png', 'clean_detection.csv', 'clean_relabel.csv', 'clean_confidence.png'):
        assert (rep/f).is_file(), f
    assert art.model is not None and 'test' not in art.model.predictions
    # the round is chosen on validation: selection.json says which round was kept and why
    sel = json.loads((tmp_path/'runs'/'notest'/'clean'/'selection.json').read_text())
    # (the stop-and-keep rule itself is tested with hand-built predictions in 03_clean: `select_rounds`)
    (d,) = sel['decisions']
    assert (d['iteration'], d['against']) == (1, 0) and d['verdict'] in ('helped', 'hurt', 'no measurable effect')
    assert sel['kept_iteration'] == (1 if d['verdict'] == 'helped' else 0) and sel['rounds_run'] == 1, sel
    from aliprod.rundirs import resolve_iteration
    assert resolve_iteration(exp, 'kept') == sel['kept_iteration']   # what the later stages read as 'kept'
    assert art.rounds.kept.sum() == 1 and {'dropped_many', 'dropped_medium', 'dropped_few'} <= set(art.rounds.columns)


def test_a_round_never_guts_the_data(tmp_path, data):
    "A model at chance (simulated) or a round changing more than 40% / more than the model's error is refused before it writes, unless allow_aggressive"
    import warnings
    from aliprod.config import ExperimentParams, ParamsError
    from aliprod.clean import clean_iteration, guard_round, round_problems
    from aliprod.data import load_index
    from aliprod.rundirs import run_dir
    from aliprod.predictions import TopK, write_topk
    from aliprod.train import TrainParams
    idx, tr, t = data
    rng = np.random.default_rng(1)
    def at_chance(part, K=50, k=5):
        labs = np.argsort(rng.random((len(part), K)), 1)[:, :k].astype(np.int32)
        return TopK(part.row.to_numpy(np.int64), part.label.to_numpy(np.int32), labs, np.full((len(part), k), 1 / K, np.float32),
                    np.full(len(part), 1 / K, np.float32), K)
    _, _, s = clean_index(idx, at_chance(tr), CleanParams(min_per_class=2))
    with pytest.raises(ParamsError, match=r'near chance: val top-1 error 9\d\.\d%.*would drop or relabel \d+ of 3200 training images \((\d+)\.\d%\)'):
        guard_round(s, 0.98, 'val', 50, CleanParams(min_per_class=2))
    # the simulated trained model's round (its in-sample error standing in for val) is sane
    _, _, ok = clean_index(idx, t, CleanParams(min_per_class=2))
    assert round_problems(ok, float((t.top1 != t.labels).mean()), 'val', 50, CleanParams()) == []
    # more than the model's own error explains, with a good model: refused too
    assert 'more than the model' in round_problems(ok, 0.01, 'val', 50, CleanParams())[0]
    # through the stage: nothing of the round is written
    exp = ExperimentParams(experiment='guts', runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    d = run_dir(exp, 'data'); idx.to_parquet(d/'index.parquet', index=False)
    pd.DataFrame({'label': np.arange(50), 'class_name': [f'c{j}' for j in range(50)], 'coarse_label': np.arange(50) // 5}).to_parquet(d/'classes.parquet', index=False)
    (d/'dataset.json').write_text(json.dumps({'root': str(d/'images'), 'num_classes': 50}))
    def preds(it, fold=None, folds=None):
        ix = load_index(exp, it)
        for sp in ('train', 'val'): write_topk(tmp_path/'p'/f'{sp}.parquet', at_chance(ix[ix.split == sp]))
        return tmp_path/'p'/'train.parquet'
    with pytest.raises(ParamsError, match='clean.allow_aggressive: true'):
        clean_iteration(exp, None, TrainParams(), CleanParams(iteration=1, min_per_class=2), train_model=False, predictions_of=preds)
    assert not (run_dir(exp, 'clean', 1)/'index.parquet').exists()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        art = clean_iteration(exp, None, TrainParams(), CleanParams(iteration=1, min_per_class=2, allow_aggressive=True), train_model=False, predictions_of=preds)
    assert art.summary['guard'] and art.summary['model_error_from'] == 'val' and any('allow_aggressive is true' in str(x.message) for x in w)


def test_prototype_rule_flags_a_planted_tail_sample_and_keeps_its_siblings():
    "RoLT's prototype rule with a per-class threshold: a 3-image class's mislabelled image is flagged, its 2 clean siblings kept"
    from aliprod.noise import prototype_rule, class_relative
    r = np.random.default_rng(3)
    D, K = 16, 6
    means = r.normal(size=(K, D)); means /= np.linalg.norm(means, axis=1, keepdims=True)
    y_true = np.r_[np.repeat(np.arange(5), 80), [5, 5, 2]]
    x = means[y_true] + 0.25 * r.normal(size=(len(y_true), D)) / np.sqrt(D)
    y = np.r_[y_true[:-1], 5]
    z = 8 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ means.T
    t = topk_from_probs(np.exp(z) / np.exp(z).sum(1, keepdims=True), y, k=3, feats=x.astype(np.float32))
    flags, near = prototype_rule(t)
    assert flags[-3:].tolist() == [False, False, True] and near[-1] == 2
    assert flags[:-3].sum() <= 2


def _long_tail_probs(seed, spread, K=200, N=2000):
    "Dense probabilities of a model on a 300 -> 3 long tail whose top-10 holds about half to nine tenths of the mass"
    r = np.random.default_rng(seed)
    n = np.round(300 * 0.01 ** (np.arange(K) / (K - 1))).astype(int)
    y = r.choice(K, N, p=n / n.sum())
    logits = r.normal(0, spread, (N, K)) + np.log(n)
    logits[np.arange(N), y] += r.uniform(0, 4, N)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), y, n


@pytest.mark.parametrize('seed,spread', [(0, 2.0), (1, 2.0), (2, 3.0)])
def test_balanced_rule_against_the_dense_posterior(seed, spread):
    from aliprod.noise import balanced_low_conf, balanced_scores
    p, y, n = _long_tail_probs(seed, spread)
    q = p / n; q /= q.sum(1, keepdims=True)                           # the dense prior-corrected posterior
    dense = (p.argmax(1) != y) & (q.argmax(1) != y) & (q.max(1) < 0.5)
    t = topk_from_probs(p, y, k=10)
    assert np.median(1 - t.topk_probs.sum(1)) > 0.1                  # much of the mass lies outside the top-10
    lo, hi, label_lo, label_hi = balanced_scores(t, n)
    qk = np.take_along_axis(q, t.topk_labels.astype(np.int64), 1)
    assert (lo <= qk * (1 + 1e-5)).all() and (qk <= hi * (1 + 1e-5)).all()
    ql = q[np.arange(len(y)), y]
    assert (label_lo <= ql * (1 + 1e-5)).all() and (ql <= label_hi * (1 + 1e-5)).all()
    flags, top, least = balanced_low_conf(t, 0.5, n)
    assert not (flags & ~dense).any(), f"{int((flags & ~dense).sum())} flags the dense rule does not make"
    assert flags.sum() > 0.3 * dense.sum()                            # sound, and not by flagging nothing
    assert (least <= q.max(1) * (1 + 1e-5)).all()
    # with the whole posterior (k = K) the bounds meet and the decision is the dense one, row by row
    full = topk_from_probs(p, y, k=len(n))
    lo, hi, _, _ = balanced_scores(full, n)
    np.testing.assert_allclose(lo, hi, rtol=1e-5)
    np.testing.assert_array_equal(balanced_low_conf(full, 0.5, n)[0], dense)


def test_rounds_past_the_stop_are_not_candidates_downstream(tmp_path):
    "Round 2 ran past the stop (an explicit iteration 2): the system's rounds and 'kept' are the stop rule's (0..1, kept 0)"
    from aliprod.config import ExperimentParams
    from aliprod.rundirs import resolve_iteration, run_dir
    from aliprod.system import cleaning_rounds_run
    exp = ExperimentParams(experiment='past', runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    sel = run_dir(exp, 'clean')/'selection.json'
    sel.write_text(json.dumps({'kept_iteration': 0, 'rounds_run': 2, 'past_stop': [2]}))
    assert cleaning_rounds_run(exp) == 1 and resolve_iteration(exp, 'kept') == 0
    sel.write_text(json.dumps({'kept_iteration': 1, 'rounds_run': 2}))   # a selection from before past_stop existed
    assert cleaning_rounds_run(exp) == 2 and resolve_iteration(exp, 'kept') == 1
