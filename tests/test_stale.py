"Issue #21 C: the report and the system stage read only current outputs, and only what the parameters produce"
import dataclasses, json, shutil
from pathlib import Path
import numpy as np, pytest
from aliprod.config import ExperimentParams, ParamsError
from aliprod.rundirs import experiment_dir
from aliprod.predictions import read_topk, write_topk
from aliprod.report import ReportParams, collect_metrics, run_report
from aliprod.system import SystemParams, run_system


def small_run(tmp:Path, name:str='stale'):
    "Data (5 classes, no test split), a tiny model (1 epoch), the system stage (cRT, no TTA): its arguments"
    import aliprod.train as T
    from aliprod.data import DataParams
    from aliprod.rebalance import RebalanceParams
    from aliprod.tta import TTAParams
    exp = ExperimentParams(experiment=name, seed=1, runs_dir=str(tmp/'runs'), reports_dir=str(tmp/'reports'))
    data = DataParams(n_classes=5, family_size=5, max_per_class=30, min_per_class=6, val_per_class=6, test_per_class=0,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
    t = T.TrainParams(arch='test_efficientnet', pretrained=False, embed_dim=16, optimizer='sgd', wd=5e-4, img_size=32,
                      finetune_size=None, finetune_epochs=0, epochs=1, bs=16, lr=0.05, warmup_epochs=0, milestones=[1],
                      eval_splits=['train', 'val'])
    from aliprod.data import prepare_data
    prepare_data(exp, data); T.run_train(exp, data, t)   # the stages the system needs (no stage runs another)
    args = (exp, data, t, RebalanceParams(methods=['crt'], crt_epochs=1, tau_grid=[0.0, 1.0]), TTAParams(),
            SystemParams(tta_variants=[], max_members=3, bootstrap=50))
    run_system(*args)
    return args


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp('stale'))


def copy_experiment(exp:ExperimentParams, name:str)->ExperimentParams:
    "The same runs under another name (for the report, which reads files; the manifests still name the original inputs)"
    new = ExperimentParams(experiment=name, seed=exp.seed, runs_dir=exp.runs_dir, reports_dir=exp.reports_dir)
    shutil.copytree(experiment_dir(exp), experiment_dir(new))
    return new


def edit_predictions(f:Path):
    "Rewrite a predictions file with one probability changed: still a valid file, no longer the one its manifest names"
    t = read_topk(f)
    probs = t.topk_probs.copy(); probs[0, 0] *= 0.5
    write_topk(f, dataclasses.replace(t, topk_probs=probs))


def test_report_leaves_out_a_run_whose_rerun_crashed(run):
    "Item 1: a train run without manifest (its rerun crashed after `ensure` removed it) shows no numbers, says so"
    exp = copy_experiment(run[0], 'crashed')
    assert 'train::0' in collect_metrics(exp, 'val').source.tolist()
    (experiment_dir(exp)/'train'/'0'/'manifest.json').unlink()
    assert 'train::0' not in collect_metrics(exp, 'val').source.tolist()
    from aliprod.report import CurrentRuns
    runs = CurrentRuns(exp)
    collect_metrics(exp, 'val', runs=runs)
    assert 'train/0: no manifest (failed or unfinished run); not reported' in runs.lines()
    art = run_report(exp, ReportParams(split='val'))
    assert 'train/0: no manifest (failed or unfinished run); not reported' in art.not_reported
    assert 'train/0: no manifest (failed or unfinished run); not reported' in art.index_html.read_text()


def test_report_leaves_out_an_edited_output(run):
    exp = copy_experiment(run[0], 'edited')
    edit_predictions(experiment_dir(exp)/'rebalance'/'0'/'crt'/'predictions'/'val.parquet')
    assert 'rebalance:crt:0' not in collect_metrics(exp, 'val').source.tolist()
    art = run_report(exp, ReportParams(split='val'))
    said = 'rebalance/0: output crt/predictions/val.parquet changed since its manifest was written; not reported'
    assert said in art.not_reported


def test_truncated_manifest_elsewhere_does_not_crash_the_report(run):
    "Item 4: a truncated manifest in another run folder is 'not current', said, and the report carries on"
    exp = copy_experiment(run[0], 'truncated')
    m = experiment_dir(exp)/'rebalance'/'0'/'manifest.json'
    m.write_text(m.read_text()[:40])
    art = run_report(exp, ReportParams(split='val'))
    assert art.index_html.exists()
    assert 'train::0' in collect_metrics(exp, 'val').source.tolist()   # the other runs are still reported
    assert 'rebalance:crt:0' not in collect_metrics(exp, 'val').source.tolist()
    assert any(l.startswith('rebalance/0: manifest unreadable') for l in art.not_reported), art.not_reported


def test_system_takes_no_round_tag_or_method_of_an_earlier_configuration(run):
    "Item 2: a round 2, a finetune tag and a rebalance method of an earlier configuration are no candidates"
    exp, data, t, rp, tp, p = run
    base = experiment_dir(exp)
    left = [(base/'train'/'0', base/'train'/'2'),                          # a round of a run with more cleaning rounds
            (base/'train'/'0', base/'train-finegrained-dcl'/'0'),          # a finetune no longer in the parameters
            (base/'rebalance'/'0'/'crt', base/'rebalance'/'0'/'lws')]      # a method no longer in [rebalance] methods
    try:
        for a, b in left: shutil.copytree(a, b)
        for d in ('train/2', 'train-finegrained-dcl/0'):
            assert json.loads((base/d/'manifest.json').read_text())['outputs']   # a valid manifest: its outputs match
        art = run_system(*run)
        assert art.system['choices']['rounds'] == [0]
        names = ' '.join(art.candidates['candidate'].astype(str))
        for old in ('train:2', 'iteration 2', 'finegrained', 'lws'): assert old not in names, names
        assert 'train:0' in names and 'crt' in names   # the current runs still are
        from aliprod.system import pool_runs
        pool = pool_runs(exp, [0], t, tp)
        assert base/'train'/'0' in pool['train']
        assert not {base/'train'/'2', base/'train-finegrained-dcl'/'0'} & set(pool['train'])
    finally:
        for _, b in left: shutil.rmtree(b, ignore_errors=True)


def test_system_notices_an_edited_upstream_predictions_file(tmp_path):
    "Item 3: `--stages system` after an upstream predictions file was edited re-runs without it, or refuses naming it"
    exp, data, t, rp, tp, p = args = small_run(tmp_path, 'edited')
    base = experiment_dir(exp)
    # another backbone's run on the same round: an ensemble candidate
    shutil.copytree(base/'train'/'0', base/'train-b'/'0')
    first = run_system(*args)
    key = lambda: json.loads((base/'system'/'manifest.json').read_text())['key']
    key1 = key()
    assert any('train-b:0' in c for c in first.candidates['candidate'].astype(str))
    edit_predictions(base/'train-b'/'0'/'predictions'/'val.parquet')
    again = run_system(*args)
    assert key() != key1, 'the system reused its outputs although a candidate it read was edited'
    assert not any('train-b:0' in c for c in again.candidates['candidate'].astype(str))
    # a round's own predictions edited: the system refuses, naming the run, the file and the fix
    edit_predictions(base/'train'/'0'/'predictions'/'val.parquet')
    said = r"train/0 is not what the current parameters produce \(output predictions/val.parquet changed"
    with pytest.raises(ParamsError, match=said):
        run_system(*args)

