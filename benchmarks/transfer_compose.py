"""Which composition, declared before it is measured, is below every single technique at 3 val images per class?
Offline, from the saved predictions of the two runs of `python benchmarks/transfer.py` (runs/demo_3val*/: same models,
the halves of val in both roles). Each composition is a top-10 probability average (`aliprod.system.combine`, what a
several-member system recipe predicts), judged like the system: against every single technique of the run on the
reporting images of each order, then on all of val (each image judged by the composition its other half chose).

Compositions (declared in the commit that adds this file, before any was measured):
- every head: the mean of every classifier method the rebalance stage wrote at the kept round (no choice);
- inseparable heads: the method step's candidates (the plain model and every head) the choosing images cannot separate
  from the lowest one (the paired 95% interval of Δ against it includes 0), averaged;
- every head + TTA: every head and the TTA stage's ten-crop prediction of the plain model, averaged (no choice);
- every prediction: the mean of the run's 13 single-technique predictions (no choice);
- inseparable predictions: the inseparable rule applied to the 13.

With --views-and-rounds, four more (declared in a second commit, after the first five were measured and none passed):
- every head, both views: the 8 heads of the kept model on its plain and on its ten-crop@1.5 view-averaged
  embeddings (16);
- every head, two models: the 8 heads of the kept model and 8 heads fitted the same way (classifier-only,
  `rebalance_features`, τ and the NCM temperature on the choosing images) on the embeddings of the cleaned round's
  model, train/1 (16);
- every head, two models, both views: the 32;
- inseparable, two models, both views: the inseparable rule on the two plain models and the 32.

    python benchmarks/transfer_compose.py [--views-and-rounds] [--runs-dir DIR] [--params A.yaml B.yaml]

It reads runs/demo_3val*/ (or the runs of --params) as they are and writes
benchmarks/results/transfer_compose[_extended].json (or --out).
"""
from __future__ import annotations
import argparse
from dataclasses import replace
import numpy as np, pandas as pd

from aliprod.core import project_root
from aliprod.config import resolve_params
from aliprod.rundirs import atomic_write_json
from aliprod.data import load_index
from aliprod.metrics import paired_hits, paired_bootstrap, holm
from aliprod.system import evaluation_sets, pool_candidates, report_target, combine, choose_error, choose_delta

PARAMS = ['params/demo_3val.yaml', 'params/demo_3val_swap.yaml']
STEPS:list[dict] = []   # the interval rule's steps (--views-and-rounds)


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


def _every_embedding(model, df, root, size:int):
    "Ten-crop@1.5 view-averaged embeddings of every image of `df`; one that fails to load stops the benchmark (halves compare the same images)"
    from aliprod.deploy import view_embeddings
    f, loaded = view_embeddings(model, df, root, size, {'views': 'ten', 'enlarge': 1.5})
    if not loaded.all():
        bad = df['path'].to_numpy()[~loaded]
        raise RuntimeError(f"{len(bad)} val image(s) failed to load, e.g. {bad[0]}: restore them or run the data stage again")
    return f


def heads_of_round(params:str, exp, index, sets, pool:list, r:int, cache:dict)->dict:
    "View -> round r's model's 8 heads as Candidates ('plain': stored val embeddings, 'ten': ten-crop@1.5 averaged)"
    import torch
    from aliprod.rundirs import experiment_dir
    from aliprod.data import dataset_info, shot_groups
    from aliprod.rebalance import rebalance_features, _load_split
    from aliprod.decoupled import ncm_temperature
    from aliprod.system import Candidate, _rows_df
    from aliprod.deploy import _load_member_model, view_embeddings, build_head, head_tensors
    from aliprod.decoupled import head_topk, Features
    base, info = experiment_dir(exp), dataset_info(exp)
    K, root = int(info['num_classes']), info['root']
    member = next(c for c in pool if c.name == f'train:{r}').recipe['members'][0]
    model, t = _load_member_model(base, member, K, 'cpu', cache)
    val, _ = _load_split(base/'train'/str(r)/'predictions'/'val.parquet')
    val = val.take(np.flatnonzero(np.isin(val.rows, np.concatenate([sets.choose_rows, sets.report_rows]))))
    if r == 0:   # the run's own heads (NCM calibrated on the choosing images by method_candidates)
        # round 0's rebalance only: a system with [system] models: rounds also leaves rebalance/<r> of other rounds
        heads = {c.info['method']: c.recipe['members'][0]['head'] for c in pool
                 if c.name.split(':')[0] == 'rebalance' and c.name.split(':')[-1] == str(r)}
    else:        # fitted as the rebalance stage fits the classifier-only methods, τ chosen on the choosing images
        rp = resolve_params('rebalance', params)
        tr, tk = _load_split(base/'train'/str(r)/'predictions'/'train.parquet')
        keep = np.flatnonzero(tr.labels >= 0)
        res = rebalance_features(model.classifier, {'train': tr.take(keep), 'val': val}, K, rp,
                                 train_p_label=np.asarray(tk.p_label)[keep], seed=exp.seed, groups=shot_groups(exp),
                                 choose_rows=sets.choose_rows)
        heads = {m: head_tensors(m, {k: v.detach().cpu() for k, v in x.head.state_dict().items()}, rp.ncm_norm)
                 for m, x in res.items() if m not in ('baseline', 'tau_norm')}
        if 'ncm' in heads:
            ch = np.isin(val.rows, sets.choose_rows)
            T = ncm_temperature(build_head({**heads['ncm'], 'temperature': 1.0}),
                                torch.as_tensor(val.feats[ch], dtype=torch.float32), val.labels[ch])
            heads['ncm'] = {**heads['ncm'], 'temperature': T}
    df = _rows_df(index, val.rows)
    feats = {'plain': torch.as_tensor(np.asarray(val.feats), dtype=torch.float32),
             'ten': _every_embedding(model, df, root, t.eval_size)}
    def halves(tk):
        pos = pd.Series(np.arange(len(tk)), index=tk.rows)
        return [tk.take(pos.loc[rows].to_numpy()) for rows in (sets.choose_rows, sets.report_rows)]
    def cand(m, h, v, f):   # a placeholder member: these heads are measured here, never deployed
        tk = head_topk(build_head(h, model.classifier), Features(val.rows, val.labels, f), 10)
        return Candidate(f'{m}:{r}:{v}', {'members': [{'head': f'{m}:{r}:{v}'}]}, *halves(tk), {'method': m})
    return {v: [cand(m, h, v, f) for m, h in sorted(heads.items())] for v, f in feats.items()}


def rule_steps(params:str, plain, h0:dict, mode:str='mean')->list[dict]:
    "The interval rule on `compose: average`'s two steps, choosing images (and TTA replacing the views instead)"
    from aliprod.system import report_delta
    every = combine(h0['plain'], mode, 10, name='every head')
    both = combine(h0['plain'] + h0['ten'], mode, 10, name='every head, both views')
    ten = combine(h0['ten'], mode, 10, name='every head, ten-crop views only')
    out = []
    for a, b in ((plain, every), (every, both), (every, ten)):
        d, r = choose_delta(a, b), report_delta(a, b)
        out.append({'params': params, 'from': a.name, 'to': b.name, 'choose': [d.delta, d.lo, d.hi],
                    'verdict': d.verdict, 'report_given_labels': [r.delta, r.lo, r.hi]})
        print(f"  rule step, {params}: {a.name} -> {b.name}: choosing {100*d.delta:+.1f} [{100*d.lo:+.1f}, "
              f"{100*d.hi:+.1f}] ({d.verdict}); reporting (given labels) {100*r.delta:+.1f} [{100*r.lo:+.1f}, "
              f"{100*r.hi:+.1f}]")
    return out


def order(params:str, extended:bool=False, runs_dir:str|None=None)->tuple[dict, dict, np.ndarray]:
    "Single techniques and compositions of one order, and the targets of its reporting rows"
    exp = resolve_params('experiment', params, overrides={'runs_dir': runs_dir})
    index = load_index(exp, 0)
    sets = evaluation_sets(index, exp.seed)
    pool = pool_candidates(exp, sets, 10)
    comps = compositions(pool)
    if extended:
        cache = {}
        h0, h1 = (heads_of_round(params, exp, index, sets, pool, r, cache) for r in (0, 1))
        plain = [c for c in pool if c.name in ('train:0', 'train:1')]
        every = h0['plain'] + h0['ten'] + h1['plain'] + h1['ten']
        for name, members in (('every head, both views', h0['plain'] + h0['ten']),
                              ('every head, two models', h0['plain'] + h1['plain']),
                              ('every head, two models, both views', every),
                              ('inseparable, two models, both views', inseparable(plain + every))):
            comps[name] = (combine(members, 'mean', 10, name=name), [c.name for c in members])
        STEPS.extend(rule_steps(params, plain[0], h0))
        for v, hs in (*h0.items(), *h1.items()):   # each new head alone, for the record (not a technique of the run)
            for c in hs:
                e = choose_error(replace(c, choose=c.report))
                print(f"  {params}: {c.name} reporting error (given labels) {100*e:.1f}")
    return {c.name: c for c in pool}, comps, report_target(index, sets.report_rows, 'clean')


def versus(comp, singles:dict, y)->dict:
    "Technique -> PairedHits (technique, composition) on the reporting images"
    return {n: paired_hits(c.report, comp.report, clean_label=y, names=(n, comp.name)) for n, c in singles.items()}


def table(hits:dict, B:int)->pd.DataFrame:
    rows = []
    for n, h in hits.items():
        d = paired_bootstrap(h, B=B, seed=0)
        rows.append({'technique': n, 'technique_err': d.a, 'system_err': d.b, 'Δ': d.delta, 'lo': d.lo, 'hi': d.hi,
                     'p': d.p})
    t = pd.DataFrame(rows)
    t['p (Holm)'] = holm(t['p'].to_numpy(float))
    return t.sort_values('technique_err').reset_index(drop=True)


def summary(t:pd.DataFrame)->str:
    below = int((t['hi'] < 0).sum())
    worst = t.loc[t['Δ'].idxmax()]
    holm_below = int(((t['p (Holm)'] < 0.05) & (t['Δ'] < 0)).sum())
    return (f"error {100*t['system_err'].iloc[0]:.1f}; below {int((t['Δ'] < 0).sum())}/{len(t)} (point), {below} with "
            f"an interval excluding 0, {holm_below} after Holm; closest: {worst.technique} {100*worst['Δ']:+.1f} "
            f"[{100*worst.lo:+.1f}, {100*worst.hi:+.1f}]; below every one: {below == len(t)}")


FIRST = ('every head', 'inseparable heads', 'every head + TTA', 'every prediction', 'inseparable predictions')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--bootstrap', type=int, default=10_000)
    ap.add_argument('--runs-dir', default=None, help='where the runs are (default: the parameter files\' runs_dir)')
    ap.add_argument('--views-and-rounds', action='store_true',
                    help='the four compositions that embed val (minutes) instead of the first five')
    ap.add_argument('--params', nargs=2, default=list(PARAMS), help='the two parameter files, one per order of the halves')
    ap.add_argument('--out', default=None)
    a = ap.parse_args(argv)
    orders = [order(f, a.views_and_rounds, a.runs_dir) for f in a.params]
    res = {}
    for name in orders[0][1]:
        if a.views_and_rounds and name in FIRST: continue
        per, hits = [], []
        for f, (singles, comps, y) in zip(a.params, orders):
            comp, members = comps[name]
            h = versus(comp, singles, y); hits.append(h)
            t = table(h, a.bootstrap)
            per.append({'params': f, 'members': members, 'vs': t.to_dict('records')})
            print(f"{name} | {f}: members {members}\n    {summary(t)}")
        keys = ('rows', 'y', 'hit_a', 'hit_b')
        cat = lambda hs: replace(hs[0], **{k: np.concatenate([getattr(h, k) for h in hs]) for k in keys},
                                 n_unknown=sum(h.n_unknown for h in hs))
        # the techniques both orders have (an order that kept another round also has that round's techniques)
        both = {n: cat([h[n] for h in hits]) for n in hits[0] if all(n in h for h in hits)}
        t = table(both, a.bootstrap)
        print(f"{name} | both orders ({len(next(iter(both.values())))} images): {summary(t)}")
        print('    ' + '; '.join(f"{r.technique} {100*r.technique_err:.1f} {100*r.Δ:+.1f} [{100*r.lo:+.1f}, "
                                 f"{100*r.hi:+.1f}]" for r in t.itertuples()))
        res[name] = {'orders': per, 'both': t.to_dict('records')}
    sfx = '_extended' if a.views_and_rounds else ''
    out = a.out or str(project_root()/'benchmarks'/'results'/f"transfer_compose{sfx}.json")
    if STEPS: res['rule_steps'] = STEPS
    atomic_write_json(out, res)
    print(f"wrote {out}")


if __name__ == '__main__': main()
