"The system stage (aliprod.system): choices never read the reporting images, the chain's Δs and verdicts, the artifact reloaded in a fresh process"
import dataclasses, json, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from aliprod.config import ExperimentParams
from aliprod.rundirs import experiment_dir, report_dir
from aliprod.predictions import TopK, topk_from_probs, read_topk
from aliprod.metrics import evaluate, choosing_half
from aliprod.system import (Candidate, single, _member_recipe, pick, greedy_ensemble, compose, choice_step, chain_table, metric_interval,
                            evaluation_sets, SystemParams, run_system)
from aliprod.deploy import predict_system

K = 6
VR, TR = np.arange(60), np.arange(100, 160)

def fake(acc, rows, K, seed, k=4):
    "A synthetic system whose top-1 is right with per-class probability acc[label]"
    g = np.random.default_rng(seed)
    labels = rows % K
    p = g.dirichlet(np.full(K, 0.5), len(rows))
    right = g.random(len(rows)) < np.asarray(acc)[labels]
    p[right, labels[right]] += 2.0
    return topk_from_probs(p / p.sum(1, keepdims=True), labels, rows, k)

def cand(name, acc, seed, report_labels=None):
    c = single(name, _member_recipe(name, {}), fake(np.broadcast_to(acc, K), VR, K, seed), fake(np.broadcast_to(acc, K), TR, K, seed + 1), k=4)
    if report_labels is not None:
        r = c.report
        c.report = TopK(r.rows, np.asarray(report_labels, np.int32), r.topk_labels, r.topk_probs, r.p_label, K)
    return c

def compose_fake(report_labels=None):
    c = lambda *a: cand(*a, report_labels=report_labels)
    steps = [('round', choice_step(lambda prev: [c('r0', .4, 0), c('r1', .6, 2), c('r2', .5, 4)])),
             ('method', choice_step(lambda prev: [prev, c(prev.name + '+crt', np.linspace(.5, .9, K), 6), c('ncm', .55, 8)])),
             ('tau', choice_step(lambda prev: [prev, c('tau', .65, 12)])),
             ('ensemble', lambda prev: greedy_ensemble(prev, [c('e1', .5, 14), c('e2', .7, 16), c('e3', .3, 18)], max_members=3))]
    chain, table = compose(steps)
    return chain, table


def test_poisoned_reporting_labels_never_change_a_choice():
    "Garbage, shuffled or shifted labels of the reporting images: the same choices and the same choosing numbers"
    chain, table = compose_fake()
    names = [x.name for _, x in chain]
    for poison in (np.zeros(len(TR)), np.random.default_rng(1).permutation(TR % K), (TR + 1) % K):
        c2, t2 = compose_fake(poison)
        assert [x.name for _, x in c2] == names
        # the choosing columns are the same; the reporting columns (recorded beside them, never read by a choice) moved
        report = [c for c in table if c.startswith('report_')]
        assert report, 'the candidates table records each candidate on the reporting images'
        pd.testing.assert_frame_equal(t2.drop(columns=report), table.drop(columns=report))
        assert not t2[report].equals(table[report])
        assert not np.array_equal(c2[-1][1].report.labels, chain[-1][1].report.labels)   # the poison did reach the reporting images


def test_chain_delta_is_exactly_the_difference_of_the_rows():
    chain, _ = compose_fake()
    y = TR % K
    rows = [('Baseline', cand('base', .3, 40), 'b'), *[(s, c, s) for s, c in chain[:2]], ('+ absent', None, 'not run'), *[(s, c, s) for s, c in chain[2:]]]
    t = chain_table(rows, y)
    present = t[t['status'] == 'present'].reset_index(drop=True)
    for i in range(1, len(present)):
        assert present.loc[i, 'Δ mean class err'] == present.loc[i, 'mean_class_err'] - present.loc[i - 1, 'mean_class_err']
        m = evaluate(rows[[r[0] for r in rows].index(present.loc[i, 'step'])][1].report, clean_label=y, topk=(1,))
        assert present.loc[i, 'mean_class_err'] == m['mean_class_err']
        lo, hi, d = present.loc[i, ['Δ lo', 'Δ hi', 'Δ mean class err']]
        v = present.loc[i, 'verdict']
        assert v == ('helped' if hi < 0 else 'hurt' if lo > 0 else 'no measurable effect')   # the verdict follows the interval
    assert t.loc[t['step'] == '+ absent', 'what'].item() == 'not run' and t['verdict'].notna().sum() == len(present) - 1
    assert (t['verdict'] == 'helped').any()     # 0.3 -> 0.6 accuracy on 60 images is measurable


def test_metric_interval_covers_the_metric():
    c = cand('x', .6, 3)
    e, lo, hi = metric_interval(c.report, TR % K, B=500)
    assert e == evaluate(c.report, topk=(1,))['mean_class_err'] and lo < e < hi


def test_ties_keep_the_first_candidate():
    a = cand('a', .5, 0)
    b = Candidate('b', a.recipe, a.choose, a.report)
    assert pick([a, b], 's')[0].name == 'a'


# ---------------------------------------------------------------- the stage on a tiny run without a test split

def _tiny_trained(tmp, experiment:str, seed:int, max_per_class:int):
    "A run of 5 classes without a test split and its model trained 1 epoch: (exp, data, train params)"
    import aliprod.train as T
    from aliprod.data import DataParams
    exp = ExperimentParams(experiment=experiment, seed=seed, runs_dir=str(tmp/'runs'), reports_dir=str(tmp/'reports'))
    data = DataParams(n_classes=5, family_size=5, max_per_class=max_per_class, min_per_class=6, val_per_class=6, test_per_class=0,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
    t = T.TrainParams(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=None, finetune_epochs=0, epochs=1, bs=16, lr=0.05,
                      warmup_epochs=0, milestones=[1], eval_splits=['train', 'val'])
    from aliprod.data import prepare_data
    prepare_data(exp, data); T.run_train(exp, data, t)   # the stages the system needs (no stage runs another)
    return exp, data, t

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "Data (5 classes, no test split), a model trained 1 epoch, its rebalance (cRT, τ-norm), then the system stage"
    from aliprod.rebalance import RebalanceParams
    from aliprod.tta import TTAParams
    exp, data, t = _tiny_trained(tmp_path_factory.mktemp('system'), 'sys', seed=1, max_per_class=30)
    rp = RebalanceParams(methods=['crt', 'tau_norm', 'ncm'], crt_epochs=1, tau_grid=[0.0, 0.5, 1.0])
    p = SystemParams(tta_variants=['five@1.5'], max_members=3, bootstrap=200)
    args = (exp, data, t, rp, TTAParams(), p)
    return exp, run_system(*args), args


def test_halves_are_disjoint_and_the_reporting_half_made_no_choice(tiny):
    exp, art, _ = tiny
    s = art.system
    assert s['sets']['choose_split'] == s['sets']['report_split'] == 'val' and 'choosing half of val' in s['sets']['how']
    ch, rep = read_topk(art.predictions['choose']), read_topk(art.predictions['report'])
    assert not set(ch.rows) & set(rep.rows)
    from aliprod.data import load_index
    idx = load_index(exp, 0)
    val = idx[idx['split'] == 'val']
    half = choosing_half(val['row'].to_numpy(), val['label'].to_numpy(), exp.seed)
    assert set(ch.rows) == set(val['row'][half]) and set(rep.rows) == set(val['row'][~half])
    # every candidate of the head, τ and TTA choices has its number on the choosing half (a NaN column fails)
    imgs = art.candidates.loc[art.candidates['step'].isin(['classifier method', 'τ', 'TTA']), 'choose_images']
    assert len(imgs) and (imgs == len(ch)).all(), imgs
    from aliprod.escape import read_csv_safe
    assert read_csv_safe(report_dir(exp)/'chain.csv')['step'].tolist() == art.chain['step'].tolist()
    assert all(step in (art.out_dir/'chain.md').read_text() for step in art.chain['step'])


def test_chain_lists_every_row_and_the_high_res_row_says_where(tiny):
    exp, art, _ = tiny
    c = art.chain
    assert list(c['step']) == ['Baseline', '+ Data cleaning (chosen rounds)', '+ Rebalanced classifier', '+ τ-normalisation',
                               '+ TTA (enlarge + crops)', '+ High-resolution finetune', '+ Ensemble']
    hr = c[c['step'] == '+ High-resolution finetune'].iloc[0]
    assert hr['status'] == 'absent' and 'finetune_size is null' in hr['what']
    assert c.loc[c['status'] == 'present', 'verdict'].iloc[1:].isin(['helped', 'hurt', 'no measurable effect']).all()
    n = art.system['numbers']
    assert n['lo'] <= n['mean_class_err'] <= n['hi'] and n['mean_class_err'] == c[c['status'] == 'present'].iloc[-1]['mean_class_err']


def test_artifact_reloaded_in_a_fresh_process_predicts_the_same_topk(tiny, tmp_path):
    exp, art, _ = tiny
    from aliprod.data import load_index
    rep = read_topk(art.predictions['report'])
    idx = load_index(exp, 0).set_index('row').loc[rep.rows].reset_index()
    idx[['row', 'path', 'label']].to_parquet(tmp_path/'images.parquet')
    code = ("import sys, pandas as pd; from aliprod.deploy import predict_system; from aliprod.predictions import write_topk; "
            f"write_topk({str(tmp_path/'out.parquet')!r}, predict_system({str(art.out_dir)!r}, pd.read_parquet({str(tmp_path/'images.parquet')!r})))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    new = read_topk(tmp_path/'out.parquet')
    assert np.array_equal(new.rows, rep.rows) and np.array_equal(new.topk_labels, rep.topk_labels)
    np.testing.assert_allclose(new.topk_probs, rep.topk_probs, atol=1e-5)


def test_an_unreadable_new_image_gets_no_prediction_and_is_listed(tiny, tmp_path):
    "predict_system on new images, one unreadable: no prediction under its row (never the next image's), listed; the rest as the stage"
    import shutil
    from aliprod.data import load_index
    exp, art, _ = tiny
    rep = read_topk(art.predictions['report'])
    idx = load_index(exp, 0).set_index('row').loc[rep.rows[:3]].reset_index()
    names = [f'new{i}{Path(p).suffix}' for i, p in enumerate(idx['path'])]
    for p, n in zip(idx['path'], names): shutil.copyfile(Path(art.system['data_root'])/p, tmp_path/n)
    (tmp_path/names[1]).write_bytes(b'\x89PNG truncated')   # a delivered system meets a broken file
    failed = []
    new = predict_system(art.out_dir, names, root=tmp_path, failed=failed)
    assert list(new.rows) == [0, 2], new.rows                  # the old bare DataLoader gave row 1 the next image's top-k
    assert np.array_equal(new.topk_labels, rep.topk_labels[[0, 2]])
    np.testing.assert_allclose(new.topk_probs, rep.topk_probs[[0, 2]], atol=1e-5)
    assert [(r, p) for r, p, _ in failed] == [(1, names[1])]


def test_rerun_is_a_skip(tiny):
    exp, art, args = tiny
    before = json.loads((art.out_dir/'manifest.json').read_text())
    again = run_system(*args)
    assert json.loads((art.out_dir/'manifest.json').read_text())['finished'] == before['finished'] and again.system == art.system


def _outputs(nb)->str:
    "Every text and HTML output of an executed notebook, joined"
    return '\n'.join(str(o.get('text', '')) + str(o.get('data', {}).get('text/plain', '')) + str(o.get('data', {}).get('text/html', ''))
                     for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


def test_explore_notebook_walks_a_run_and_skips_a_missing_one(tiny, tmp_path):
    "nbs/explore.ipynb under papermill on the tiny run (no cleaning round): every cell runs, the tables show; no run: it skips"
    import nbformat, papermill as pm
    exp, art, _ = tiny
    nb = Path(__file__).resolve().parents[1]/'nbs'/'explore.ipynb'
    pm.execute_notebook(str(nb), str(tmp_path/'out.ipynb'), parameters={'experiment': str(experiment_dir(exp))},
                        kernel_name='python3', progress_bar=False, cwd=str(tmp_path))
    text = _outputs(nbformat.read(tmp_path/'out.ipynb', 4))
    assert "Run 'sys' at" in text and 'no cleaning round in this run' in text
    assert 'acc train' in text and 'acc system' in text                                  # the per-class table, side by side
    assert 'balanced_softmax' in text or 'crt' in text or 'ncm' in text                   # the rebalance table
    assert 'no measurable effect' in text and 'mean_class_err sys' in text                # compare: the run against itself
    pm.execute_notebook(str(nb), str(tmp_path/'none.ipynb'), parameters={'experiment': str(tmp_path/'runs'/'none')},
                        kernel_name='python3', progress_bar=False, cwd=str(tmp_path))
    text = _outputs(nbformat.read(tmp_path/'none.ipynb', 4))
    assert 'not run' in text and 'the cells below are skipped' in text and 'acc train' not in text
    assert not (tmp_path/'runs').exists()   # exploring wrote nothing


# ---------------------------------------------------------------- every rebalance method can win, and the system still predicts

@pytest.fixture(scope='module')
def every_method(tmp_path_factory):
    "A tiny run (5 classes, no test split) rebalanced once with every method of `METHODS`, the finetunes also on the whole network"
    from aliprod.rebalance import RebalanceParams
    from aliprod.decoupled import METHODS
    from aliprod.tta import TTAParams
    exp, data, t = _tiny_trained(tmp_path_factory.mktemp('every'), 'every', seed=2, max_per_class=12)
    rp = RebalanceParams(methods=list(METHODS), finetune='both', crt_epochs=1, lws_epochs=1, finetune_epochs=1, network_epochs=1,
                         tau_grid=[0.0, 0.5, 1.0], la_tau_grid=[0.5, 1.0])   # la τ > 0: the logit-adjusted head differs from the plain one
    return exp, (exp, data, t, rp, TTAParams())


def test_every_method_can_win_and_the_system_still_predicts(every_method):
    "Each method (and -network variant) forced to win in turn ([system] plain: false): the stage composes it through TTA and the artifact predicts"
    from aliprod.data import load_index
    from aliprod.decoupled import METHODS, FINETUNES, NCM_TEMPERATURES
    from aliprod.system import pool_candidates
    from aliprod.deploy import load_system, predict_recipe
    exp, args = every_method
    idx = load_index(exp, 0)
    winners = [*METHODS, *(f'{m}-network' for m in FINETUNES)]
    for m in winners:
        fixed = dict(methods=['tau_norm'], tau_grid=[0.5]) if m == 'tau_norm' else dict(methods=[m], tau=False)
        art = run_system(*args, SystemParams(plain=False, tta_variants=['flip@1'], ensemble=False, bootstrap=50, **fixed))
        c, s = art.system['choices'], load_system(art.out_dir)
        assert c['method'] == ('plain' if m == 'tau_norm' else m), (m, c['method'])
        assert c['tta']['views'] == 'flip' and c['tta']['average'] == 'embedding'    # the TTA step ran with the method's head
        if m == 'tau_norm': assert c['tau'] == 0.5 and c['tau_chosen']
        head = s['recipe']['members'][0]['head']
        if m == 'logit_adjust': assert head['kind'] == 'linear' and head['bias'] is not None   # folded: b - τ·log π
        if m == 'ncm':   # calibrated on the choosing images: other reporting images leave the temperature where it is
            from aliprod.system import calibrated_ncm
            from aliprod.deploy import head_tensors
            reb, sets = experiment_dir(exp)/'rebalance'/'0', evaluation_sets(idx, exp.seed)
            raw = head_tensors('ncm', torch.load(reb/'ncm'/'head.pth', weights_only=True))
            assert raw['temperature'] == 1.0 and head['temperature'] in NCM_TEMPERATURES
            for other in (sets.choose_rows, sets.report_rows[:3]):
                assert calibrated_ncm(raw, reb, experiment_dir(exp)/'train'/'0', dataclasses.replace(sets, report_rows=other), 4)[0]['temperature'] == head['temperature']
        rep = read_topk(art.predictions['report'])
        df = idx.set_index('row').loc[rep.rows[:8]].reset_index()[['row', 'path', 'label']]
        new = predict_system(art.out_dir, df)
        assert np.array_equal(new.topk_labels, rep.topk_labels[:8]), m
        np.testing.assert_allclose(new.topk_probs, rep.topk_probs[:8], atol=1e-4)
    # every head of the run as an ensemble member: the recipe of their top-k average predicts too
    pool = pool_candidates(exp, evaluation_sets(idx, exp.seed), 4)
    heads = {c.info.get('method') for c in pool}
    assert set(winners) - {'tau_norm'} <= heads, heads
    recipe = {'members': [mm for c in pool for mm in c.recipe['members']], 'mode': 'mean', 'k': 4}
    out = predict_recipe(recipe, experiment_dir(exp), df, s['data_root'], s['num_classes'])
    assert len(out) == len(df) and np.isfinite(out.topk_probs).all()


def test_system_rows_name_their_tta_and_compare_with_a_single_technique_chosen_on_choosing_images(every_method):
    "The TTA row says it averages embeddings; the single technique is chosen on the choosing images, Δ paired on the reporting images"
    exp, args = every_method
    art = run_system(*args, SystemParams(plain=False, methods=['crt'], tau=False, tta_variants=['flip@1'], ensemble=False, bootstrap=50))
    tta = art.chain.set_index('step').loc['+ TTA (enlarge + crops)', 'what']
    assert 'view-averaged embeddings' in tta and "TTA stage's rows average the views' probabilities" in tta
    assert art.candidates.loc[art.candidates['step'] == 'TTA', 'candidate'].str.endswith('view-averaged embeddings').all()
    n = art.system['numbers']
    v = n['vs_single_technique']
    from aliprod.data import load_index
    from aliprod.system import pool_candidates, choose_error
    pool = pool_candidates(exp, evaluation_sets(load_index(exp, 0), exp.seed), 10)
    errs = [round(choose_error(c), 12) for c in pool]
    assert v['technique'] == pool[int(np.argmin(errs))].name and v['choose_mean_class_err'] == min(errs)   # chosen on the choosing images
    assert v is not None and v['candidates'] >= 10 and v['b'] == n['mean_class_err']   # b: the system on the reporting images
    # the interval's ends come from the bootstrap's own sums: equal to Δ at a degenerate draw up to float rounding
    assert v['delta'] == v['b'] - v['a'] and v['lo'] - 1e-9 <= v['delta'] <= v['hi'] + 1e-9
    assert 'chosen on the choosing images' in v['sentence']


def test_transfer_benchmark_reads_both_halves_and_every_single_technique(tiny, tmp_path):
    "Each candidate's Δ on both halves, the system against every single technique, and benchmarks/transfer.py reading them"
    import yaml
    from aliprod.escape import read_csv_safe
    exp, art, _ = tiny
    c = art.candidates
    picked = c[c['step'].isin(['cleaning round', 'classifier method', 'τ']) & c['report_mean_class_err'].notna()]
    assert len(picked) and (picked['report_mean_class_err'].between(0, 1)).all()   # recorded on the reporting half too
    vs, v = read_csv_safe(art.out_dir/'system_vs_techniques.csv'), art.system['numbers']['vs_single_technique']
    assert len(vs) == v['candidates'] and (vs['Δ lo'] <= vs['Δ (system − technique)']).all() and (vs['p (Holm)'] >= vs['p']).all()
    assert np.isclose(vs.set_index('technique').loc[v['technique'], 'Δ (system − technique)'], v['delta'])
    p = tmp_path/'sys.yaml'
    p.write_text(yaml.safe_dump({'experiment': exp.experiment, 'seed': exp.seed, 'runs_dir': exp.runs_dir, 'reports_dir': exp.reports_dir}))
    out = tmp_path/'transfer.json'
    r = subprocess.run([sys.executable, str(Path(__file__).parents[1]/'benchmarks'/'transfer.py'), '--no-run', '--params', str(p), str(p),
                        '--bootstrap', '50', '--out', str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    o = res['orders'][0]
    assert [t['step'] for t in o['transfer']] == list(art.chain.loc[art.chain['status'] == 'present', 'step'].iloc[1:])
    assert all(t['transferred'] for t in o['transfer']) and {'interval (the system)', 'point estimate'} <= {x['rule'] for x in o['rules']}
    both = res['both_orders_vs_techniques']   # the same run twice: every technique, twice the reporting images
    assert len(both) == len(vs) and {b['images'] for b in both} == {2 * art.system['sets']['report_images']}
    assert '| step | system | Δ choosing' in r.stdout and 'below every one with an interval' in r.stdout
    from aliprod.report import run_report, ReportParams   # the report shows both: did the choices transfer, and against whom
    rep = run_report(exp, ReportParams(split='val', hires_tag=None, bootstrap=50))
    assert rep.tables['choices_transfer']['step'].tolist() == [t['step'] for t in o['transfer']]
    assert len(rep.tables['system_vs_techniques']) == len(vs) and '>Choices transfer</h2>' in rep.index_html.read_text()


def test_average_of_every_head_with_tta_views_is_what_the_artifact_predicts(every_method):
    "compose: average: every head averaged (each on its own model), TTA adding each on its views; the artifact predicts"
    from aliprod.data import load_index
    from aliprod.deploy import load_system
    exp, args = every_method
    heads = ['crt', 'ncm', 'two_stage-network']   # two heads on the run's model, one on its own finetuned model
    art = run_system(*args, SystemParams(compose='average', methods=heads, plain=False, tta_variants=['flip@1'],
                                           ensemble=False, bootstrap=50))
    c, s = art.system['choices'], load_system(art.out_dir)
    members = s['recipe']['members']
    assert c['method'] == 'every head' and c['compose'] == 'average' and c['heads'] == heads
    assert len({m['model'] for m in members}) == 2
    # every head on both views: the plain embeddings first, then the TTA views
    assert len(members) == 2 * len(heads) and all(m['tta'] is None for m in members[:len(heads)])
    assert all(m['tta']['views'] == 'flip' and m['tta']['average'] == 'embedding' for m in members[len(heads):])
    assert c['tta']['views'] == 'flip' and not c['tau_chosen'] and 'weights' not in s['recipe']   # an equal share each
    cands = art.candidates
    assert cands.loc[cands['step'] == 'classifier method', 'candidate'].tolist() == ['every head (iteration 0)']
    assert 'averages' in cands.loc[cands['step'] == 'τ', 'note'].iloc[0]
    assert 'each head also' in art.chain.set_index('step').loc['+ TTA (enlarge + crops)', 'what']
    assert c['members'] == ['every head (iteration 0)']
    assert '6 heads and views' in art.chain.set_index('step').loc['+ Ensemble', 'what']
    rep = read_topk(art.predictions['report'])
    df = load_index(exp, 0).set_index('row').loc[rep.rows[:8]].reset_index()[['row', 'path', 'label']]
    new = predict_system(art.out_dir, df)
    assert np.array_equal(new.topk_labels, rep.topk_labels[:8])
    np.testing.assert_allclose(new.topk_probs, rep.topk_probs[:8], atol=1e-4)


# ---------------------------------------------------------------- [system] models: rounds (a second model, declared)

@pytest.fixture(scope='module')
def two_rounds(tmp_path_factory):
    "A tiny run (5 classes, no test split) with one cleaning round (train/0, train/1), rebalanced at iteration 0"
    from aliprod.clean import CleanParams, run_clean
    from aliprod.rebalance import RebalanceParams, run_rebalance
    from aliprod.tta import TTAParams
    exp, data, t = _tiny_trained(tmp_path_factory.mktemp('rounds'), 'rounds', seed=3, max_per_class=12)
    run_clean(exp, data, t, CleanParams(iteration=1, allow_aggressive=True))   # a 1-epoch model is near chance
    rp = RebalanceParams(methods=['crt', 'ncm'], crt_epochs=1, tau_grid=[0.0, 1.0], iteration=0)
    run_rebalance(exp, data, t, rp)
    return exp, (exp, data, t, rp, TTAParams())


def test_every_head_of_both_rounds_on_both_views_is_what_the_artifact_predicts(two_rounds):
    "models: rounds, declared (plain: false): round 1's heads join round 0's on both views; a rerun is a skip; it predicts"
    from aliprod.data import load_index
    from aliprod.deploy import load_system
    from aliprod.system import cleaning_rounds_run
    exp, args = two_rounds
    assert cleaning_rounds_run(exp) == 1   # round 1 ran: the second model exists
    p = SystemParams(compose='average', models='rounds', plain=False, rounds=[0], tta_variants=['flip@1'],
                     ensemble=False, bootstrap=50)
    art = run_system(*args, p)
    c, s = art.system['choices'], load_system(art.out_dir)
    members = s['recipe']['members']
    assert c['round'] == 0 and c['rounds_added'] == [1] and c['heads'] == ['crt', 'ncm']
    # 2 heads x 2 views on train/0, then the same on train/1: an equal share each, no weights in the recipe
    assert [m['model'] for m in members] == ['train/0/model.pth'] * 4 + ['train/1/model.pth'] * 4
    assert [m['tta'] is None for m in members] == [True, True, False, False] * 2 and 'weights' not in s['recipe']
    assert all(m['tta']['views'] == 'flip' for m in members if m['tta'] is not None)
    ens = art.candidates[art.candidates['step'] == 'ensemble']
    # the declared addition taken over the previous system with its Δ on both sets recorded, then the ensemble's own
    # pick ([system] ensemble: false keeps it)
    assert ens['chosen'].tolist() == [False, True, True] and ens['candidate'].iloc[1] == ens['candidate'].iloc[2]
    assert ens['candidate'].iloc[1].endswith('+ every head (iteration 1) on both views (flip@1)')
    assert ens['note'].iloc[1] == 'declared ([system] plain: false)'
    assert np.isfinite(ens[['choose_Δ_vs_default', 'report_Δ_vs_default']].iloc[1].to_numpy(float)).all()
    assert 'every head (iteration 1) on both views (flip@1) added ([system] models: rounds)' in \
        art.chain.set_index('step').loc['+ Ensemble', 'what']
    before = json.loads((art.out_dir/'manifest.json').read_text())
    again = run_system(*args, p)   # the other round's rebalance ran before the key was made: a skip
    assert json.loads((art.out_dir/'manifest.json').read_text())['finished'] == before['finished']
    assert again.system == art.system
    rep = read_topk(art.predictions['report'])
    df = load_index(exp, 0).set_index('row').loc[rep.rows[:8]].reset_index()[['row', 'path', 'label']]
    new = predict_system(art.out_dir, df)
    assert np.array_equal(new.topk_labels, rep.topk_labels[:8])
    np.testing.assert_allclose(new.topk_probs, rep.topk_probs[:8], atol=1e-4)
