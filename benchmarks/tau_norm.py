"""Why τ-normalisation helps or not: classifier row norms against class size, by optimiser and sampling.

Kang et al. (ICLR 2020, Figure 2) find that a classifier trained jointly on long-tailed data with SGD has row norms
that grow with class size, and τ-normalisation (divide row i by ‖w_i‖^τ) divides that bias out. The demo's model
is trained with AdamW (decoupled weight decay 0.05) and head capping at 60 images per class, the real recipe
(params/aliproducts.yaml) with SGD (weight decay 5e-4) on every image. This script separates the two factors on a
run's own cached embeddings (the train stage's predictions with train: save_feats, else runs/<exp>/rebalance/<iteration>/features/): it trains
a linear classifier (no bias) from scratch on them with each optimiser x sampling, then for every head measures
the Spearman correlation of row norm with training class size, the τ chosen on val, and τ-norm's effect on test
mean class error with its class-stratified paired 95% interval (aliprod.metrics.paired_delta). The network's own
classifier (what the rebalance stage τ-normalises) is the first row. No image is read, no network trained.

    python benchmarks/tau_norm.py                        # params/demo.yaml, after make demo
    python benchmarks/tau_norm.py --params params/demo.yaml --iteration kept --epochs 30
Results: a printed table, benchmarks/results/tau_norm.json and tau_norm.png (--out).
"""
from __future__ import annotations
import argparse, time
from pathlib import Path
import numpy as np, torch, pyarrow.parquet as pq

from aliprod.core import project_root
from aliprod.config import resolve_params
from aliprod.rundirs import atomic_write_json, run_dir, resolve_iteration
from aliprod.data import shot_groups
from aliprod.metrics import paired_delta
from aliprod.predictions import read_topk
from aliprod.decoupled import (Features, crt_head, fit_head, head_topk, sweep_tau, choose_tau, tau_normalized_head)
from aliprod.rebalance import weight_norms, norm_size_correlation
from aliprod.samplers import head_cap, class_counts
from aliprod.train import load_trained_model

# (name, optimiser, sampling, lr, weight decay): the recipe's SGD and the demo's AdamW, on every image or head-capped
CONFIGS = [('SGD, all images (the recipe)', 'sgd', 'all', 0.05, 5e-4),
           ('SGD, head cap', 'sgd', 'cap', 0.05, 5e-4),
           ('AdamW, all images', 'adamw', 'all', 2e-3, 0.05),
           ('AdamW, head cap (the demo)', 'adamw', 'cap', 2e-3, 0.05)]


def load_features(exp, iteration:int)->dict[str, Features]:
    "Split -> cached embeddings of the model of `iteration`: the train stage's predictions when they carry them (train: save_feats), else the rebalance stage's features/"
    tr = run_dir(exp, 'train', iteration)/'predictions'
    d = run_dir(exp, 'rebalance', iteration)/'features'
    has = lambda f: f.exists() and 'feats' in pq.read_schema(f).names
    src = tr if has(tr/'train.parquet') else d
    if not has(src/'train.parquet'):
        raise SystemExit(f"no embeddings of iteration {iteration}: neither {tr}/train.parquet (train: save_feats) nor {d}/train.parquet; "
                         f"run the rebalance stage first (make demo, or aliprod run <params> --stages rebalance)")
    out = {}
    for s in ('train', 'val', 'test'):
        if has(src/f'{s}.parquet'):
            t = read_topk(src/f'{s}.parquet', feats=True)
            out[s] = Features(t.rows.astype(np.int64), t.labels.astype(np.int64), np.asarray(t.feats, np.float32))
    return out


def judge(name:str, weight:torch.Tensor, splits:dict, groups:dict, counts:np.ndarray, seed:int)->dict:
    "ρ(norm, class size), τ chosen on val, and τ-norm's Δ test mean class error with its paired interval"
    head0 = tau_normalized_head(weight, None, 0.0, 'none')
    rho = norm_size_correlation(weight_norms(head0, counts))
    sweep = sweep_tau(weight, None, splits['val'], groups, bias_mode='none')
    tau = choose_tau(sweep)
    ev = 'test' if 'test' in splits else 'val'
    a, b = head_topk(head0, splits[ev]), head_topk(tau_normalized_head(weight, None, tau, 'none'), splits[ev])
    d = paired_delta(a, b, 'mean_class_err', seed=seed, **groups).to_dict()
    f = paired_delta(a, b, 'few_acc', seed=seed, **groups).to_dict()
    n = weight.norm(dim=1).numpy()
    many, few = counts > groups['many'], counts < groups['few']
    return {'classifier': name, 'spearman_norm_vs_size': rho, 'norm_many_over_few': float(n[many].mean() / n[few & (counts > 0)].mean()),
            'tau': tau, 'split': ev, 'mean_class_err': d['a'], 'mean_class_err_tau': d['b'], 'delta': d['delta'], 'lo': d['lo'], 'hi': d['hi'],
            'verdict': d['verdict'], 'few_acc': f['a'], 'few_acc_tau': f['b'], 'norms': n.tolist()}


def main(argv=None)->dict:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--params', default=str(project_root()/'params'/'demo.yaml'))
    ap.add_argument('--iteration', default='kept', help="the rebalance run whose features are read: a number, or 'kept' (the clean stage's choice)")
    ap.add_argument('--epochs', type=int, default=30); ap.add_argument('--batch', type=int, default=64); ap.add_argument('--head-cap', type=int, default=None)
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'tau_norm.json'))
    a = ap.parse_args(argv)
    exp = resolve_params('experiment', a.params)
    train_p, reb = resolve_params('train', a.params), resolve_params('rebalance', a.params)
    it = resolve_iteration(exp, a.iteration if a.iteration == 'kept' else int(a.iteration))
    cap = a.head_cap or train_p.head_cap or 60
    splits, groups = load_features(exp, it), shot_groups(exp)
    K = len(groups['train_counts'])
    tr = splits['train']
    counts = class_counts(tr.labels, K)
    torch.manual_seed(exp.seed)
    rows, t0 = [], time.time()
    own = load_trained_model(run_dir(exp, 'train', it)/'model.pth', resolve_params('train', a.params), K).classifier
    if isinstance(getattr(own, 'weight', None), torch.Tensor) and own.weight.ndim == 2:
        # the network's own classifier, bias dropped as classifier-balancing's τ-norm does (the stage's tau_bias default)
        rows.append(judge(f"the network's classifier ({train_p.optimizer}, head cap {train_p.head_cap})", own.weight.detach().float().cpu(), splits, groups, counts, exp.seed))
    for name, opt, sampling, lr, wd in CONFIGS:
        data = tr.take(head_cap(tr.labels, cap, exp.seed)) if sampling == 'cap' else tr
        head = crt_head(tr.feats.shape[1], K, bias=False, seed=exp.seed)
        fit_head(head, data, K, a.epochs, lr=lr, batch_size=a.batch, mode='instance', weight_decay=wd, optimizer=opt, seed=exp.seed)
        rows.append(judge(name.replace('head cap', f'head cap {cap}'), head.weight.detach().float(), splits, groups, counts, exp.seed))
        print(f"{rows[-1]['classifier']}: fitted in {time.time() - t0:.0f} s", flush=True)
    print(f"\nτ-normalisation on {exp.experiment} iteration {it}'s cached embeddings ({len(tr):,} training images, {K} classes); "
          f"linear heads from scratch, {a.epochs} epochs, batch {a.batch}; Δ on {rows[0]['split']} with its paired 95% interval, seed {exp.seed}\n")
    print('| classifier | ρ(‖w‖, class size) | ‖w‖ many / few | τ (val) | mean class err | with τ-norm | Δ points [95%] | verdict | few acc → with τ-norm |')
    print('|---|---:|---:|---:|---:|---:|---|---|---|')
    for r in rows:
        print(f"| {r['classifier']} | {r['spearman_norm_vs_size']:+.2f} | {r['norm_many_over_few']:.2f} | {r['tau']:g} | {r['mean_class_err']:.3f} | "
              f"{r['mean_class_err_tau']:.3f} | {100*r['delta']:+.1f} [{100*r['lo']:+.1f}, {100*r['hi']:+.1f}] | {r['verdict']} | {r['few_acc']:.2f} → {r['few_acc_tau']:.2f} |")
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.0), sharey=False)
    for ax, r in zip(np.atleast_1d(axes), rows):
        m = counts > 0
        ax.semilogx(counts[m], np.asarray(r['norms'])[m], '.', alpha=0.6)
        ax.set_title(f"{r['classifier']}\nρ = {r['spearman_norm_vs_size']:+.2f}, τ = {r['tau']:g}, Δ {100*r['delta']:+.1f}", fontsize=8)
        ax.set_xlabel('training images of the class', fontsize=8); ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel('‖w_i‖', fontsize=8)
    fig.tight_layout(); fig.savefig(out.with_suffix('.png'), dpi=100); plt.close(fig)
    res = {'params': a.params, 'iteration': it, 'epochs': a.epochs, 'batch': a.batch, 'head_cap': cap, 'seed': exp.seed, 'train_images': len(tr),
           'classes': K, 'rows': [{k: v for k, v in r.items() if k != 'norms'} for r in rows]}
    atomic_write_json(out, res)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return res


if __name__ == '__main__': main()
