"The index-scale benchmark runs end to end at a small size and writes the JSON the reports read."
import json, re, statistics, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {'load_index', 'class_counts', 'head_cap_250', 'sampler_instance', 'sampler_class', 'sampler_sqrt',
         'sampler_progressive', 'evaluate', 'per_class_accuracy'}


def test_index_scale_small(tmp_path):
    out = tmp_path/'index_scale.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'index_scale.py'), '--n-images', '20000', '--n-classes', '500',
                        '--repeats', '2', '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {'config', 'dataset', 'once', 'steps', 'rss_after_imports_mb', 'peak_rss_mb', 'hardware'} <= set(res)
    assert set(res['steps']) == STEPS
    for name, s in res['steps'].items():
        # the summary is of the repeats it lists, each a real duration (min <= median alone holds for any pair)
        assert len(s['times_s']) == 2 and all(t > 0 for t in s['times_s']), name
        assert s['min_s'] == min(s['times_s']) and s['median_s'] == statistics.median(s['times_s']), name
    assert res['config'] == {'n_images': 20000, 'n_classes': 500, 'repeats': 2, 'seed': 0, 'imbalance': 1600., 'noise': 0.1}
    d = res['dataset']
    assert d['n_rows'] == 20000 and 0 < d['n_train'] <= 20000
    assert d['head_cap_250_kept'] <= min(d['n_train'], 250*500)
    assert 0 < res['peak_rss_mb'] and 'load_index' in r.stdout


def test_index_scale_rejects_bad_repeats(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'index_scale.py'), '--repeats', '0', '--out', str(tmp_path/'x.json')],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and '--repeats must be >= 1' in r.stderr


def test_demo_time_prints_the_per_stage_breakdown(tmp_path):
    "benchmarks/demo_time.py on a tiny two-stage run: a row per stage, their seconds within the total, the run's first lines"
    import yaml
    p = tmp_path/'tiny.yaml'
    p.write_text(yaml.safe_dump({'experiment': 'tiny', 'device': 'cpu',
                                 'data': {'n_classes': 4, 'family_size': 2, 'max_per_class': 12, 'min_per_class': 4, 'val_per_class': 2,
                                          'test_per_class': 2, 'img_size': 32, 'img_size_max': 32, 'gen_workers': 1, 'scan_workers': 1},
                                 'train': {'arch': 'test_efficientnet', 'pretrained': False, 'img_size': 32, 'finetune_size': None,
                                           'finetune_epochs': 0, 'epochs': 2, 'bs': 8, 'workers': 0},
                                 'report': {'hires_tag': None}, 'pipeline': {'stages': ['train', 'report']}}))
    out = tmp_path/'demo_time.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'demo_time.py'), '--params', str(p), '--in-process', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [s['stage'] for s in res['stages']] == ['data', 'train', 'report']
    # each stage's seconds are the ones its closing log line said (the data stage's total, not its generation), printed
    for s in res['stages']:
        said = (re.findall(r'^\d\d:\d\d:\d\d data: [\d,]+ images, .* in ([\d.]+)s$', r.stdout, re.M) if s['stage'] == 'data' else
                re.findall(rf"^\d\d:\d\d:\d\d {s['stage']}: done in (\d+) s", r.stdout, re.M))
        assert [float(x) for x in said] == [s['seconds']], (s, said)
        assert f"| {s['stage']} | {s['seconds']:.0f} |" in r.stdout, s
    rest = res['total_s'] - sum(s['seconds'] for s in res['stages'])
    assert f"| start-up, HTML pages, between stages | {rest:.0f} |" in r.stdout and f"**{res['total_s']:.0f}**" in r.stdout
    assert '| train |' in r.stdout and '**total**' in r.stdout and res['first_lines'][0].endswith('data, train, report')


def test_tau_norm_benchmark_on_a_tiny_run(tmp_path):
    "benchmarks/tau_norm.py on a tiny train + rebalance run: the network's classifier and the four optimiser x sampling heads, each judged"
    import yaml
    p = tmp_path/'tiny.yaml'
    p.write_text(yaml.safe_dump({'experiment': 'tinytau', 'device': 'cpu', 'runs_dir': str(tmp_path/'runs'), 'reports_dir': str(tmp_path/'reports'),
                                 'data': {'n_classes': 6, 'family_size': 2, 'max_per_class': 24, 'min_per_class': 3, 'val_per_class': 3,
                                          'test_per_class': 3, 'img_size': 32, 'img_size_max': 32, 'gen_workers': 1, 'scan_workers': 1},
                                 'train': {'arch': 'test_efficientnet', 'pretrained': False, 'img_size': 32, 'finetune_size': None,
                                           'finetune_epochs': 0, 'epochs': 2, 'bs': 8, 'workers': 0, 'head_cap': 12},
                                 'rebalance': {'iteration': 0, 'methods': ['tau_norm'], 'finetune': 'classifier'},
                                 'pipeline': {'stages': ['train', 'rebalance']}}))
    r = subprocess.run([str(Path(sys.executable).parent/'aliprod'), 'run', str(p), '--in-process'], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path/'tau_norm.json'
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'tau_norm.py'), '--params', str(p), '--iteration', '0', '--epochs', '3', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    names = [row['classifier'] for row in res['rows']]
    assert names[0].startswith("the network's classifier") and len(names) == 5 and any('SGD' in n for n in names) and any('AdamW' in n for n in names)
    for row in res['rows']:
        assert -1 <= row['spearman_norm_vs_size'] <= 1 and row['lo'] <= row['delta'] <= row['hi'] and row['split'] == 'test'
        assert row['verdict'] in ('helped', 'hurt', 'no measurable effect') and row['tau'] >= 0
    assert (tmp_path/'tau_norm.png').stat().st_size > 0 and '| classifier |' in r.stdout
