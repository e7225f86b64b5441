"Training seeds: `aliprod run --seeds 0,1` trains each seed in its own run tree on the same images and roles; the first seed's report aggregates them"
import json
import pandas as pd, pytest, torch
from aliprod.pipeline import main
from aliprod.config import resolve_params
from aliprod.report import ONE_SEED, SEEDS_RULE, run_report

TINY = """experiment: sd
seed: 0
device: cpu
runs_dir: {tmp}/runs
reports_dir: {tmp}/reports
data: {{n_classes: 5, family_size: 5, max_per_class: 10, min_per_class: 6, val_per_class: 4, test_per_class: 4,
        img_size: 32, img_size_max: 40, gen_workers: 1, scan_workers: 1}}
train: {{arch: test_efficientnet_ln, pretrained: false, optimizer: sgd, img_size: 32, finetune_size: null, finetune_epochs: 0, epochs: 1, bs: 16, lr: 0.05, warmup_epochs: 0,
         milestones: [1], eval_splits: [val, test]}}
tta: {{views: flip, enlarge: 1.0, splits: [test]}}
report: {{bootstrap: 200}}
pipeline: {{html: false}}
"""
RUN = ['--in-process', '--stages', 'train', 'tta', 'report', '--seeds', '0,1']


def _finished(runs):
    return {str(m.relative_to(runs)): json.loads(m.read_text())['finished'] for m in sorted(runs.glob('**/manifest.json'))}


def test_two_seeds_two_trees_same_images_and_an_aggregated_report(tmp_path):
    "Two seeds: two run trees, different weights, identical images and roles; the report has both seeds' values, their mean and the rule"
    p = tmp_path/'seeds.yaml'; p.write_text(TINY.format(tmp=tmp_path))
    assert main(['run', str(p), *RUN]) == 0
    runs, reps = tmp_path/'runs', tmp_path/'reports'
    a, b = (torch.load(runs/e/'train'/'0'/'model.pth', weights_only=False) for e in ('sd', 'sd-seed1'))
    sa, sb = (x['model'] if isinstance(x, dict) and 'model' in x else x for x in (a, b))
    assert sa.keys() == sb.keys() and any(not torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
    ia, ib = (pd.read_parquet(runs/e/'data'/'index.parquet') for e in ('sd', 'sd-seed1'))
    pd.testing.assert_frame_equal(ia[['row', 'path', 'label', 'split', 'role']], ib[['row', 'path', 'label', 'split', 'role']])
    first = ia['path'].iloc[0]
    assert (runs/'sd'/'data'/'images'/first).read_bytes() == (runs/'sd-seed1'/'data'/'images'/first).read_bytes()
    # the aggregated table: each seed's value is the one its own report gives, and the mean is theirs
    agg = pd.read_csv(reps/'sd'/'seeds_alone.csv')
    own = {s: pd.read_csv(reps/e/'techniques_alone.csv').set_index('technique') for s, e in ((0, 'sd'), (1, 'sd-seed1'))}
    assert len(agg) and set(agg['technique']) == set(own[0].index) == set(own[1].index)
    for _, r in agg.iterrows():
        e0, e1 = (own[s].loc[r['technique'], 'mean_class_err'] for s in (0, 1))
        assert r['mean_class_err seed 0'] == pytest.approx(e0) and r['mean_class_err seed 1'] == pytest.approx(e1)
        assert r['mean_class_err mean'] == pytest.approx((e0 + e1) / 2)
        assert r['Δ lo seed 1'] == pytest.approx(own[1].loc[r['technique'], 'Δ lo'])
        assert r['verdict over seeds'].split(' (')[0] in ('helped in every seed', 'hurt in every seed', 'no consistent effect')
    readme = (reps/'sd'/'README.md').read_text()
    assert SEEDS_RULE in readme and 'seed 1 in sd-seed1/' in readme and ONE_SEED not in readme
    assert ONE_SEED in (reps/'sd-seed1'/'README.md').read_text()   # each seed's own page is one seed's numbers
    # resumed: the data and the training of both seeds are up to date, nothing is indexed or trained again
    before = _finished(runs)
    assert main(['run', str(p), '--in-process', '--stages', 'train', '--seeds', '0,1']) == 0
    assert _finished(runs) == before and any(k.startswith('sd-seed1/train/') for k in before)
    # a seed whose index is not the first seed's (its roles changed by hand; `aliprod run` would index it again) pairs
    # with nothing: left out, and said
    idx = ib.assign(role=ib['role'].iloc[::-1].to_numpy()); idx.to_parquet(runs/'sd-seed1'/'data'/'index.parquet')
    run_report(resolve_params('experiment', p, overrides={'seeds': [0, 1]}), resolve_params('report', p), str(p))
    assert "left out: seed(s) 1, whose index differs" in (reps/'sd'/'README.md').read_text()
    assert pd.read_csv(reps/'sd'/'seeds_alone.csv')['mean_class_err seed 1'].isna().all()


def test_seeds_option_and_file_key_are_checked(tmp_path, capsys):
    p = tmp_path/'s.yaml'
    p.write_text(f"experiment: sd\nseeds: [0, 2]\nruns_dir: {tmp_path}/runs\n")
    assert main(['check', str(p)]) == 0 and 'seeds 0, 2: runs/sd, runs/sd-seed2' in capsys.readouterr().out
    assert main(['check', str(p), '--seeds', '1,1']) == 2 and 'seeds must be a non-empty list of distinct' in capsys.readouterr().err
    assert main(['run', str(p), '--seeds', 'a,b', '--dry-run']) == 2 and '--seeds must list seeds' in capsys.readouterr().err
    p.write_text("experiment: sd\nseed: 0\nseeds: [0, 2]\n")
    assert main(['check', str(p)]) == 2 and 'both seed: and seeds:' in capsys.readouterr().err
