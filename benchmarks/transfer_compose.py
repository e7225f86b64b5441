"""Which composition, declared before it is measured, is below every single technique at 3 val images per class? Offline,
from the saved predictions of the two runs of `python benchmarks/transfer.py` (runs/demo_3val*/: same models, the halves
of val in both roles). Each composition is a top-10 probability average (`aliprod.system.combine`, what a multi-member
system recipe predicts), judged like the system: against every single technique of the run on the reporting images of
each order, then on all of val (each image judged by the composition its other half chose: cross-fitting).

Compositions (declared in the commit that adds this file, before any was measured):
- every head: the mean of every classifier method the rebalance stage wrote at the kept round (no choice);
- inseparable heads: the method step's candidates (the plain model and every head) the choosing images cannot separate
  from the lowest one (the paired 95% interval of Δ against it includes 0), averaged;
- every head + TTA: every head and the TTA stage's ten-crop prediction of the plain model, averaged (no choice);
- every prediction: the mean of the run's 13 single-technique predictions (no choice);
- inseparable predictions: the inseparable rule applied to the 13.

    python benchmarks/transfer_compose.py      # reads runs/demo_3val*/ as they are; writes benchmarks/results/transfer_compose.json
"""
from __future__ import annotations
import argparse
from dataclasses import replace
import numpy as np, pandas as pd

from aliprod.core import project_root, atomic_write_json, resolve_params
from aliprod.data import load_index
from aliprod.metrics import paired_hits, paired_bootstrap, holm
from aliprod.system import evaluation_sets, pool_candidates, report_target, combine, choose_error, choose_delta

PARAMS = ['params/demo_3val.yaml', 'params/demo_3val_swap.yaml']


def inseparable(cands:list)->list:
    "The lowest candidate on the choosing images and every one whose paired interval against it includes 0"
    best = min(cands, key=lambda c: round(choose_error(c), 12))
    return [best] + [c for c in cands if c is not best and choose_delta(best, c).lo <= 0]


def compositions(pool:list)->dict:
    "Name -> (composed Candidate, member names)"
    heads = [c for c in pool if c.name.startswith('rebalance:')]
    plain = [c for c in pool if c.name == 'train:0']
    tta = [c for c in pool if c.name == 'tta:ten-x1.5:0']
    out = {}
    for name, members in (('every head', heads), ('inseparable heads', inseparable(plain + heads)),
                          ('every head + TTA', heads + tta), ('every prediction', pool),
                          ('inseparable predictions', inseparable(pool))):
        out[name] = (combine(members, 'mean', 10, name=name), [c.name for c in members])
    return out


def order(params:str)->tuple[dict, dict, np.ndarray]:
    "Single techniques and compositions of one order, and the targets of its reporting rows"
    exp = resolve_params('experiment', params)
    index = load_index(exp, 0)
    sets = evaluation_sets(index, exp.seed)
    pool = pool_candidates(exp, sets, 10)
    return {c.name: c for c in pool}, compositions(pool), report_target(index, sets.report_rows, 'clean')


def versus(comp, singles:dict, y)->dict:
    "Technique -> PairedHits (technique, composition) on the reporting images"
    return {n: paired_hits(c.report, comp.report, clean_label=y, names=(n, comp.name)) for n, c in singles.items()}


def table(hits:dict, B:int)->pd.DataFrame:
    rows = []
    for n, h in hits.items():
        d = paired_bootstrap(h, B=B, seed=0)
        rows.append({'technique': n, 'technique_err': d.a, 'system_err': d.b, 'Δ': d.delta, 'lo': d.lo, 'hi': d.hi, 'p': d.p})
    t = pd.DataFrame(rows)
    t['p (Holm)'] = holm(t['p'].to_numpy(float))
    return t.sort_values('technique_err').reset_index(drop=True)


def summary(t:pd.DataFrame)->str:
    below = int((t['hi'] < 0).sum())
    worst = t.loc[t['Δ'].idxmax()]
    return (f"error {100*t['system_err'].iloc[0]:.1f}; below {int((t['Δ'] < 0).sum())}/{len(t)} (point), {below} with an "
            f"interval excluding 0, {int(((t['p (Holm)'] < 0.05) & (t['Δ'] < 0)).sum())} after Holm; closest: "
            f"{worst.technique} {100*worst['Δ']:+.1f} [{100*worst.lo:+.1f}, {100*worst.hi:+.1f}]; below every one: {below == len(t)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--bootstrap', type=int, default=10_000)
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'transfer_compose.json'))
    a = ap.parse_args(argv)
    orders = [order(f) for f in PARAMS]
    res = {}
    for name in orders[0][1]:
        per, hits = [], []
        for f, (singles, comps, y) in zip(PARAMS, orders):
            comp, members = comps[name]
            h = versus(comp, singles, y); hits.append(h)
            t = table(h, a.bootstrap)
            per.append({'params': f, 'members': members, 'vs': t.to_dict('records')})
            print(f"{name} | {f}: members {members}\n    {summary(t)}")
        both = {n: replace(hs[0], **{k: np.concatenate([getattr(h, k) for h in hs]) for k in ('rows', 'y', 'hit_a', 'hit_b')},
                           n_unknown=sum(h.n_unknown for h in hs))
                for n in hits[0] for hs in [[h[n] for h in hits]]}
        t = table(both, a.bootstrap)
        print(f"{name} | both orders ({len(next(iter(both.values())))} images): {summary(t)}")
        print('    ' + '; '.join(f"{r.technique} {100*r.technique_err:.1f} {100*r.Δ:+.1f} [{100*r.lo:+.1f}, {100*r.hi:+.1f}]"
                                 for r in t.itertuples()))
        res[name] = {'orders': per, 'both': t.to_dict('records')}
    atomic_write_json(a.out, res)
    print(f"wrote {a.out}")


if __name__ == '__main__': main()
