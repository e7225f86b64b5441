"""Index-only scale benchmark: the AliProducts-sized index (2.5M images x 50,030 classes) through the index-level code.

Times (median of --repeats) loading the index from parquet, counting classes, head capping at 250 images per class,
building each sampler and drawing one epoch, and computing the metrics on 2.5M synthetic top-10 predictions.
No images are read: this measures the bookkeeping that must stay negligible next to training.

    .venv/bin/python benchmarks/index_scale.py                                  # full size
    .venv/bin/python benchmarks/index_scale.py --n-images 20000 --n-classes 500 # seconds
"""
from __future__ import annotations
import argparse, json, platform, resource, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd

from aliprod.core import project_root
from aliprod.rundirs import atomic_write_json, hardware
from aliprod.samplers import class_counts, head_cap, LongTailSampler
from aliprod.metrics import evaluate, per_class_accuracy
from aliprod.predictions import TopK

MODES = ('instance', 'class', 'sqrt', 'progressive')


def peak_rss_mb() -> float:
    "Peak resident memory of this process so far, MB (ru_maxrss is KB on Linux, bytes on macOS)"
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == 'darwin' else r / 2**10


def timed(fn, repeats: int) -> dict:
    "Run `fn` `repeats` times; median, min and every time in seconds"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return {'median_s': statistics.median(times), 'min_s': min(times), 'times_s': times}


def synthetic_top10(labels: np.ndarray, num_classes: int, seed: int = 0, k: int = 10) -> TopK:
    "Plausible top-k predictions for `labels`: the label first for 80% of images, elsewhere in the top-5 for 10%"
    rng = np.random.default_rng(seed)
    n = len(labels)
    tl = rng.integers(0, num_classes, (n, k), dtype=np.int32)
    u = rng.random(n)
    tl[u < 0.8, 0] = labels[u < 0.8]
    near = (u >= 0.8) & (u < 0.9)
    tl[near, rng.integers(1, 5, near.sum())] = labels[near]
    probs = -np.sort(-rng.random((n, k), dtype=np.float32), axis=1)
    probs /= probs.sum(1, keepdims=True)
    return TopK(np.arange(n, dtype=np.int64), labels.astype(np.int32), tl, probs, np.full(n, np.nan, np.float32), num_classes)


def run(n_images: int, n_classes: int, repeats: int, seed: int = 0) -> dict:
    try: from aliprod.synthetic import synthetic_index
    except ImportError as e:
        raise SystemExit(f"aliprod.synthetic.synthetic_index is not available ({e}); build nbs/01e_synthetic.ipynb first") from None
    steps, once = {}, {}
    rss_start = peak_rss_mb()  # python, numpy, pandas and torch imported: the floor under every step
    t0 = time.perf_counter()
    df = synthetic_index(n_images=n_images, n_classes=n_classes, imbalance=1600., seed=seed, noise=0.1)
    once['generate_index_s'] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)/'index.parquet'
        t0 = time.perf_counter(); df.to_parquet(path, index=False); once['write_parquet_s'] = time.perf_counter() - t0
        once['parquet_mb'] = path.stat().st_size / 2**20
        del df
        steps['load_index'] = timed(lambda: pd.read_parquet(path), repeats)
        df = pd.read_parquet(path)
    train = df['label'].to_numpy()[(df['split'] == 'train').to_numpy()]
    steps['class_counts'] = timed(lambda: class_counts(train, n_classes), repeats)
    counts = class_counts(train, n_classes)
    steps['head_cap_250'] = timed(lambda: head_cap(train, 250, seed), repeats)
    kept = len(head_cap(train, 250, seed))
    for mode in MODES:
        def draw(mode=mode):
            s = LongTailSampler(train, mode, num_classes=n_classes, seed=seed, epochs=10 if mode == 'progressive' else None)
            s.set_epoch(5)  # progressive halfway: the mixture path, not the pure instance or class one
            return s.indices()
        steps[f'sampler_{mode}'] = timed(draw, repeats)
    labels = df['label'].to_numpy()
    preds = synthetic_top10(labels, n_classes, seed)
    steps['evaluate'] = timed(lambda: evaluate(preds, train_counts=counts), repeats)
    steps['per_class_accuracy'] = timed(lambda: per_class_accuracy(preds, train_counts=counts), repeats)
    metrics = evaluate(preds, train_counts=counts)
    return {'config': {'n_images': n_images, 'n_classes': n_classes, 'repeats': repeats, 'seed': seed, 'imbalance': 1600., 'noise': 0.1},
            'dataset': {'n_rows': int(len(df)), 'n_train': int(len(train)), 'max_class_count': int(counts.max()),
                        'min_class_count': int(counts.min()), 'head_cap_250_kept': kept, 'top1_err_synthetic': metrics['top1_err']},
            'once': once, 'steps': steps, 'rss_after_imports_mb': rss_start, 'peak_rss_mb': peak_rss_mb(), 'hardware': hardware(),
            'when': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


def table(res: dict) -> str:
    rows = [f"{'step':<24}{'median s':>10}{'min s':>10}"]
    rows += [f"{k:<24}{v['median_s']:>10.3f}{v['min_s']:>10.3f}" for k, v in res['steps'].items()]
    rows += [f"{k:<24}{v:>10.3f}" for k, v in res['once'].items()]
    rows.append(f"{'RSS after imports (MB)':<24}{res['rss_after_imports_mb']:>10.0f}")
    rows.append(f"{'peak RSS (MB)':<24}{res['peak_rss_mb']:>10.0f}")
    return '\n'.join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-images', type=int, default=2_500_000)
    ap.add_argument('--n-classes', type=int, default=50_030)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--out', type=Path, default=None, help='JSON results; default benchmarks/results/index_scale.json')
    a = ap.parse_args(argv)
    if a.repeats < 1: ap.error('--repeats must be >= 1')
    out = a.out or project_root()/'benchmarks'/'results'/'index_scale.json'
    res = run(a.n_images, a.n_classes, a.repeats, a.seed)
    print(f"index scale: {a.n_images:,} images x {a.n_classes:,} classes, median of {a.repeats}")
    print(table(res))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(f"wrote {out}")
    return res


if __name__ == '__main__':
    main()
