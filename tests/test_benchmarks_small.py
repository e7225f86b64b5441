"The index-scale benchmark runs end to end at a small size and writes the JSON the reports read."
import json, subprocess, sys
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
        assert len(s['times_s']) == 2 and 0 <= s['min_s'] <= s['median_s'], name
    assert res['config'] == {'n_images': 20000, 'n_classes': 500, 'repeats': 2, 'seed': 0, 'imbalance': 1600., 'noise': 0.1}
    d = res['dataset']
    assert d['n_rows'] == 20000 and 0 < d['n_train'] <= 20000
    assert d['head_cap_250_kept'] <= min(d['n_train'], 250*500)
    assert 0 < res['peak_rss_mb'] and 'load_index' in r.stdout


def test_index_scale_rejects_bad_repeats(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'index_scale.py'), '--repeats', '0', '--out', str(tmp_path/'x.json')],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and '--repeats must be >= 1' in r.stderr
