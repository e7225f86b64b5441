"""Scale benchmark of the cleaning rules (aliprod.noise) and comparison with cleanlab.

Part 1 (ours at AliProducts scale): synthetic top-k predictions for the training split of
`aliprod.synthetic.synthetic_index` (2.5M images x 50,030 classes by default), drawn by
`aliprod.noise.simulate_predictions` from the index's ground truth; one full flagging pass
(`find_noisy` + `protect_tail`) per rule set, each in a fresh process so its peak RSS is its own
(reading the predictions file included). Median wall time over --repeats, flags scored against the truth.

Part 2 (cleanlab): a dense problem small enough for cleanlab (--cl-images x --cl-classes), the same
simulated predictions made dense (top-k mass plus the rest spread evenly over the other classes);
ours runs on the top-k of that matrix, cleanlab's `filter.find_label_issues` and the batched
`experimental.label_issues_batched.find_label_issues_batched` on the matrix itself. Time ratio,
flag agreement and F1 against the truth on identical inputs.

    .venv/bin/python benchmarks/clean_scale.py                       # full size (minutes; ~3 GB)
    .venv/bin/python benchmarks/clean_scale.py --n-images 20000 --n-classes 500 --cl-images 5000 --cl-classes 200 --repeats 1 --in-process
Results: printed tables and benchmarks/results/clean_scale.json (--out).
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np

HERE = Path(__file__).resolve().parent
RULE_SETS = [['disagree_low_conf'], ['self_confidence'], ['confident_learning'], ['disagree_low_conf', 'confident_learning'], ['agreement'],
             ['class_relative'], ['balanced'], ['balanced', 'confident_learning'], ['prototype'], ['h2e']]
BANDS = ('many', 'medium', 'few')   # by the given label's training count: > 100 many, < 20 few (aliprod.metrics.shot_group's defaults)


def _peak_rss_mb()->float:
    "Peak resident memory of this process (VmHWM): unlike ru_maxrss it is not inherited from the parent across fork/exec"
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmHWM:'): return int(line.split()[1]) / 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; includes the parent's peak


def _scores(flags:np.ndarray, noisy:np.ndarray)->dict:
    tp = int((flags & noisy).sum()); fp = int((flags & ~noisy).sum()); fn = int((~flags & noisy).sum())
    p = tp / (tp + fp) if tp + fp else float('nan'); r = tp / (tp + fn) if tp + fn else float('nan')
    return {'flagged': int(flags.sum()), 'precision': p, 'recall': r, 'f1': 2 * p * r / (p + r) if tp else 0.0}


def _band_scores(flags:np.ndarray, noisy:np.ndarray, labels:np.ndarray, K:int)->dict:
    "Precision / recall / F1 within each class-size band of the given label"
    from aliprod.metrics import shot_group
    band = shot_group(np.bincount(labels, minlength=K))[labels]
    return {b: {'n': int((band == b).sum()), 'noisy': int(noisy[band == b].sum()), **_scores(flags[band == b], noisy[band == b])} for b in BANDS}


def simulate_feats(tr, K:int, dim:int=64, seed:int=0, memorize:float=0.3, top1=None)->np.ndarray:
    "(N,D) float32 embeddings a trained model might give: near the true class's direction; a memorised noisy sample halfway to its given class; a clean sample the model gets wrong (`top1`) halfway to that class"
    rng = np.random.default_rng(seed + 7)
    means = rng.normal(size=(K, dim)).astype(np.float32); means /= np.linalg.norm(means, axis=1, keepdims=True)
    y = tr['label'].to_numpy(np.int64); c = tr['clean_label'].to_numpy(np.int64)
    c = np.where(c < 0, rng.integers(0, K, len(c)), c)            # out-of-distribution: some other direction
    out = np.empty((len(y), dim), np.float32)
    for s in range(0, len(y), 1 << 18):
        sl = slice(s, s + (1 << 18))
        m = means[c[sl]]
        memo = (c[sl] != y[sl]) & (rng.random(len(m)) < memorize)
        m[memo] = 0.5 * (m[memo] + means[y[sl][memo]])
        if top1 is not None:   # the hard clean samples: the embedding is as confused as the classifier
            hard = (c[sl] == y[sl]) & (top1[sl] != y[sl])
            m[hard] = 0.5 * (m[hard] + means[top1[sl][hard]])
        out[sl] = m + 0.7 * rng.normal(size=m.shape).astype(np.float32) / np.sqrt(dim)
    return out


def worker_ours(args)->dict:
    "One rule set on the saved predictions, in this (fresh) process"
    from aliprod.clean import CleanParams, noisy_options
    from aliprod.noise import find_noisy, protect_tail
    from aliprod.predictions import read_topk
    rules = args.worker.split('+')
    base = _peak_rss_mb()  # the interpreter with numpy, pandas, pyarrow and torch (aliprod.core) imported
    t0 = time.perf_counter()
    t = read_topk(Path(args.tmp)/'pred0.parquet')
    if 'prototype' in rules or 'h2e' in rules:   # the embeddings, memory-mapped: the rules read them in chunks
        from aliprod.predictions import TopK
        t = TopK(t.rows, t.labels, t.topk_labels, t.topk_probs, t.p_label, t.num_classes, np.load(Path(args.tmp)/'feats.npy', mmap_mode='r'))
    others = [read_topk(Path(args.tmp)/'pred1.parquet')] if 'agreement' in rules else []
    load_s = time.perf_counter() - t0
    noisy = np.load(Path(args.tmp)/'truth.npy')
    p = CleanParams(rules=rules, agreement_tags=['second_model'] if 'agreement' in rules else [], min_per_class=args.min_per_class)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fl = find_noisy(t, p.rules, others=others, **noisy_options(p))
        flags = protect_tail(t.labels, fl['reasons'].to_numpy() > 0, t.p_label, p.min_per_class, t.num_classes, t.rows)
        times.append(time.perf_counter() - t0)
        del fl
    return {'rules': '+'.join(rules), 'n': len(t), 'K': t.num_classes, 'k': t.k, 'median_s': float(np.median(times)), 'times_s': times,
            'load_s': load_s, 'peak_rss_mb': _peak_rss_mb(), 'import_rss_mb': base, **_scores(flags, noisy),
            'by_band': _band_scores(flags, noisy, t.labels.astype(np.int64), t.num_classes)}


def _dense_from_topk(t, rng)->np.ndarray:
    "(N,K) float32: the top-k probabilities, the remaining mass spread evenly over the other classes"
    P = np.zeros((len(t), t.num_classes), np.float32)
    rest = np.clip(1 - t.topk_probs.sum(1), 0, None) / (t.num_classes - t.k)
    P += rest[:, None]
    np.put_along_axis(P, t.topk_labels.astype(np.int64), t.topk_probs, axis=1)
    return P


def _dense_confident_learning(P:np.ndarray, labels:np.ndarray)->np.ndarray:
    "Confident learning on dense probabilities: guess = most probable class clearing its threshold (no cleanlab argmax shortcut)"
    K = P.shape[1]
    n = np.bincount(labels, minlength=K)
    th = np.where(n > 0, np.bincount(labels, weights=P[np.arange(len(P)), labels].astype(np.float64), minlength=K) / np.maximum(n, 1), np.inf)
    masked = np.where(P >= th[None, :], P, np.float32(-1))
    guess = masked.argmax(1)
    ok = masked[np.arange(len(P)), guess] >= 0
    return ok & (guess != labels) & (P.argmax(1) != labels)


def worker_cleanlab(args)->dict:
    "Ours (top-k of the dense matrix) against cleanlab (the dense matrix) on one dense problem"
    import warnings
    from aliprod.synthetic import synthetic_index
    from aliprod.clean import CleanParams, noisy_options, is_noisy
    from aliprod.noise import find_noisy, protect_tail, simulate_predictions
    from aliprod.predictions import topk_from_probs
    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.experimental.label_issues_batched import find_label_issues_batched
    idx = synthetic_index(n_images=args.cl_images, n_classes=args.cl_classes, imbalance=args.imbalance, seed=args.seed, noise=args.noise)
    tr = idx[idx['split'] == 'train'].reset_index(drop=True)
    K = args.cl_classes
    noisy = is_noisy(tr)[0]
    P = _dense_from_topk(simulate_predictions(tr, K, k=args.k, seed=args.seed), np.random.default_rng(args.seed))
    labels = tr['label'].to_numpy(np.int64)
    dense_mb = P.nbytes / 2**20
    t = topk_from_probs(P, labels, rows=tr['row'].to_numpy(), k=args.k)
    out = {'n': len(tr), 'K': K, 'k': args.k, 'dense_mb': dense_mb, 'cleanlab_version': cleanlab.__version__, 'methods': []}
    ours_flags = {}
    for rules in (['confident_learning'], ['disagree_low_conf'], ['disagree_low_conf', 'confident_learning']):
        p = CleanParams(rules=rules, min_per_class=0)
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter(); f = find_noisy(t, p.rules, **noisy_options(p))['reasons'].to_numpy() > 0; ts.append(time.perf_counter() - t0)
        ours_flags['+'.join(rules)] = f
        out['methods'].append({'method': 'aliprod ' + '+'.join(rules) + f' (top-{args.k})', 'median_s': float(np.median(ts)), **_scores(f, noisy),
                               'agree_vs_ours_cl': float((f == ours_flags['confident_learning']).mean())})
    ref = ours_flags['confident_learning']
    # the dense reference of the paper's definition on the full matrix (what the sparse version approximates)
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); f = _dense_confident_learning(P, labels); ts.append(time.perf_counter() - t0)
    out['methods'].append({'method': 'dense confident_learning (paper definition, all K)', 'median_s': float(np.median(ts)), **_scores(f, noisy),
                           'agree_vs_ours_cl': float((f == ref).mean()), 'sparse_subset_of_dense': bool(not (ref & ~f).any())})
    def run(name, fn):
        ts = []
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            for _ in range(max(1, min(args.repeats, 2))):
                t0 = time.perf_counter(); f = np.asarray(fn()); ts.append(time.perf_counter() - t0)
        f = f.astype(bool) if f.dtype == bool else np.isin(np.arange(len(labels)), f)
        both = int((f & ref).sum()); either = int((f | ref).sum())
        out['methods'].append({'method': name, 'median_s': float(np.median(ts)), **_scores(f, noisy),
                               'jaccard_vs_ours_cl': both / either if either else 1.0, 'agree_vs_ours_cl': float((f == ref).mean())})
    run('cleanlab find_label_issues confident_learning', lambda: find_label_issues(labels, P, filter_by='confident_learning', n_jobs=1))
    run('cleanlab find_label_issues prune_by_noise_rate', lambda: find_label_issues(labels, P, filter_by='prune_by_noise_rate', n_jobs=1))
    run('cleanlab find_label_issues_batched', lambda: find_label_issues_batched(labels=labels, pred_probs=P, batch_size=10_000, n_jobs=1,
                                                                                 verbose=False, return_mask=True))
    ours_cl = next(m for m in out['methods'] if m['method'].startswith('aliprod confident_learning'))
    for m in out['methods']:
        m['time_ratio_vs_ours_cl'] = m['median_s'] / ours_cl['median_s'] if ours_cl['median_s'] else float('nan')
    out['peak_rss_mb'] = _peak_rss_mb()
    return out


def _spawn(args, worker:str)->dict:
    if args.in_process:
        a = argparse.Namespace(**{**vars(args), 'worker': worker})
        return worker_cleanlab(a) if worker == 'cleanlab' else worker_ours(a)
    cmd = [sys.executable, __file__, '--worker', worker, '--tmp', args.tmp, '--repeats', str(args.repeats),
           '--min-per-class', str(args.min_per_class), '--k', str(args.k), '--seed', str(args.seed), '--noise', str(args.noise),
           '--imbalance', str(args.imbalance), '--cl-images', str(args.cl_images), '--cl-classes', str(args.cl_classes)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    if r.returncode: raise RuntimeError(f"worker {worker} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _table(rows:list[dict], cols:list[str])->str:
    def fmt(v): return f'{v:.3f}' if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, '')) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    return '\n'.join([' | '.join(c.ljust(w[i]) for i, c in enumerate(cols)), '-+-'.join('-' * x for x in w),
                      *(' | '.join(x[i].ljust(w[i]) for i in range(len(cols))) for x in cells)])


def main(argv=None)->dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n-images', type=int, default=2_500_000); ap.add_argument('--n-classes', type=int, default=50_030)
    ap.add_argument('--imbalance', type=float, default=1600.); ap.add_argument('--noise', type=float, default=0.1)
    ap.add_argument('--k', type=int, default=10); ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--feat-dim', type=int, default=64, help='embedding size of the simulated feats (prototype and h2e rules)')
    ap.add_argument('--repeats', type=int, default=3); ap.add_argument('--min-per-class', type=int, default=5)
    ap.add_argument('--cl-images', type=int, default=100_000, help='images of the dense cleanlab comparison')
    ap.add_argument('--cl-classes', type=int, default=2_000, help='classes of the dense cleanlab comparison')
    ap.add_argument('--rule-sets', nargs='*', help="only these rule sets (names as in the table, e.g. h2e disagree_low_conf+confident_learning)")
    ap.add_argument('--skip-cleanlab', action='store_true'); ap.add_argument('--max-dense-gb', type=float, default=2.0)
    ap.add_argument('--out', default=str(HERE/'results'/'clean_scale.json'))
    ap.add_argument('--in-process', action='store_true', help='run every rule set in this process (fast start; peak RSS is then cumulative)')
    ap.add_argument('--worker', help=argparse.SUPPRESS); ap.add_argument('--tmp', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = worker_cleanlab(args) if args.worker == 'cleanlab' else worker_ours(args)
        print(json.dumps(res)); return res
    from aliprod.synthetic import synthetic_index
    from aliprod.clean import is_noisy
    from aliprod.noise import simulate_predictions
    from aliprod.predictions import write_topk
    from aliprod.rundirs import hardware
    res = {'config': {k: v for k, v in vars(args).items() if k not in ('worker', 'tmp')},
           'peak_rss_note': 'VmHWM of the process running the rule set' + (' (all rule sets in one process: cumulative)' if args.in_process else
                                                                             ' (a fresh process per rule set; import_rss_mb: the interpreter with aliprod imported)'), 'hardware': hardware(),
           'target': {'rules': 'disagree_low_conf+confident_learning', 'max_s': 30, 'max_rss_mb': 3072}}
    with tempfile.TemporaryDirectory(prefix='clean_scale.') as tmp:
        args.tmp = tmp
        t0 = time.perf_counter()
        idx = synthetic_index(n_images=args.n_images, n_classes=args.n_classes, imbalance=args.imbalance, seed=args.seed, noise=args.noise)
        tr = idx[idx['split'] == 'train'].reset_index(drop=True); del idx
        noisy = is_noisy(tr)[0]
        np.save(Path(tmp)/'truth.npy', noisy)
        t0_ = simulate_predictions(tr, args.n_classes, k=args.k, seed=args.seed)
        write_topk(Path(tmp)/'pred0.parquet', t0_)
        write_topk(Path(tmp)/'pred1.parquet', simulate_predictions(tr, args.n_classes, k=args.k, seed=args.seed + 1))
        np.save(Path(tmp)/'feats.npy', simulate_feats(tr, args.n_classes, args.feat_dim, args.seed, top1=t0_.top1.astype(np.int64))); del t0_
        res['data'] = {'train_images': len(tr), 'classes': args.n_classes, 'noisy_fraction': float(noisy.mean()),
                       'noise_kinds': tr['noise_kind'].value_counts().to_dict(), 'setup_s': time.perf_counter() - t0}
        del tr
        print(f"{res['data']['train_images']:,} training images x {args.n_classes:,} classes, top-{args.k}, "
              f"{res['data']['noisy_fraction']:.1%} noisy; setup {res['data']['setup_s']:.0f} s", flush=True)
        sets = [r for r in RULE_SETS if not args.rule_sets or '+'.join(r) in args.rule_sets]
        if not sets: raise SystemExit(f"--rule-sets {args.rule_sets}: none of {['+'.join(r) for r in RULE_SETS]}")
        res['ours'] = [_spawn(args, '+'.join(r)) for r in sets]
        print(_table(res['ours'], ['rules', 'n', 'K', 'median_s', 'peak_rss_mb', 'import_rss_mb', 'flagged', 'precision', 'recall', 'f1']), flush=True)
        bands = [{'rules': o['rules'], 'band': b, **o['by_band'][b]} for o in res['ours'] for b in BANDS]
        print('\nby class-size band of the given label (many > 100, few < 20 training images):')
        print(_table(bands, ['rules', 'band', 'n', 'noisy', 'flagged', 'precision', 'recall', 'f1']), flush=True)
        target = next((r for r in res['ours'] if r['rules'] == 'disagree_low_conf+confident_learning'), None)
        if target is not None: res['target'].update(met=bool(target['median_s'] <= 30 and target['peak_rss_mb'] <= 3072),
                                                    median_s=target['median_s'], peak_rss_mb=target['peak_rss_mb'])
        dense_gb = args.cl_images * args.cl_classes * 4 / 2**30
        if args.skip_cleanlab: res['cleanlab'] = {'skipped': 'by --skip-cleanlab'}
        elif dense_gb > args.max_dense_gb:
            res['cleanlab'] = {'skipped': f'dense matrix would take {dense_gb:.1f} GB > --max-dense-gb {args.max_dense_gb}'}
        else:
            res['cleanlab'] = _spawn(args, 'cleanlab')
            c = res['cleanlab']
            print(f"\ncleanlab {c['cleanlab_version']} comparison: {c['n']:,} x {c['K']:,} dense ({c['dense_mb']:.0f} MB), peak RSS {c['peak_rss_mb']:.0f} MB")
            print(_table(c['methods'], ['method', 'median_s', 'time_ratio_vs_ours_cl', 'flagged', 'precision', 'recall', 'f1', 'agree_vs_ours_cl']))
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + '\n')
    print(f"\nwrote {out}")
    return res


if __name__ == '__main__':
    main()
