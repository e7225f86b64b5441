"""Do the system's choices transfer from a tiny val? The demo recipe at 3 val images per class with no test split
(params/demo_3val.yaml): half of every class of val chooses, the other half reports; params/demo_3val_swap.yaml swaps
the halves (data.choose_half: 1). For each order it prints and writes:

- per step of the chain (cleaning round, classifier method, τ, TTA, ensemble): the chosen system's Δ mean class error
  on the choosing images and on the reporting images, each with its paired 95% interval, and whether it transferred;
- per step, the candidate a point estimate would have picked (the lowest choosing error) beside the one the rule
  picked (a candidate replaces the default only with a paired interval excluding 0): their Δ on both sets; and the
  same two rules applied to the other half (earlier steps held fixed), from the candidates' recorded Δ on both halves;
- the composed system against every single technique on the reporting images (Δ, paired interval, Holm's p).

Then both orders together (cross-fitting): every val image reports once, judged by the system chosen on the other
half; the system against every single technique present in both orders on all of val, each Δ with its paired interval.

    python benchmarks/transfer.py           # aliprod run of both parameter files (skipped when up to date), then reads them
    python benchmarks/transfer.py --no-run     # reads runs/demo_3val*/ as they are
"""
from __future__ import annotations
import argparse, json
from pathlib import Path
import numpy as np, pandas as pd

from aliprod.core import project_root
from aliprod.config import resolve_params
from aliprod.rundirs import atomic_write_json, experiment_dir
from aliprod.escape import read_csv_safe
from aliprod.report import transfer_table

PARAMS = ['params/demo_3val.yaml', 'params/demo_3val_swap.yaml']
# the steps `pick` makes (the ensemble's members: greedy_ensemble)
RULE_STEPS = ['cleaning round', 'classifier method', 'τ', 'TTA']


def rule_rows(cands:pd.DataFrame)->pd.DataFrame:
    "Per pick step: the rule's choice and a point estimate's (lowest choosing error), their Δ vs the default on both sets"
    rows = []
    for step in RULE_STEPS:
        c = cands[cands['step'] == step].reset_index(drop=True)
        if not len(c): continue
        for rule, i in (('interval (the system)', int(np.flatnonzero(c['chosen'].astype(bool))[0])),
                        ('point estimate', int(c['choose_mean_class_err'].to_numpy(float).argmin()))):
            r = c.loc[i]
            rows.append({'step': step, 'rule': rule, 'candidate': r['candidate'], 'candidates': len(c), 'default': i == 0,
                         **{k: float(r.get(k, np.nan)) for k in ('choose_Δ_vs_default', 'choose_Δ_lo', 'choose_Δ_hi',
                                                                  'report_Δ_vs_default', 'report_Δ_lo', 'report_Δ_hi')}})
        # the same step with the halves' roles exchanged, the earlier steps held at this order's choices: every
        # candidate has both halves' Δ against the same default, so the rule can be applied to the other half
        rep = c['report_Δ_vs_default'].to_numpy(float) if 'report_Δ_vs_default' in c else np.full(len(c), np.nan)
        if len(c) < 2 or np.isnan(rep[1:]).any(): continue   # a candidate never predicted on the reporting half (TTA)
        err = c['report_mean_class_err'].to_numpy(float)
        helped = [i for i in range(1, len(c)) if c.loc[i, 'report_Δ_hi'] < 0]
        for rule, i in (('interval, halves swapped', min(helped, key=lambda i: (err[i], i)) if helped else 0),
                        ('point estimate, halves swapped', int(err.argmin()))):
            r = c.loc[i]
            rows.append({'step': step, 'rule': rule, 'candidate': r['candidate'], 'candidates': len(c), 'default': i == 0,
                         **{f'{to}_Δ{x}': float(r[f'{fr}_Δ{x}']) for to, fr in (('choose', 'report'), ('report', 'choose'))
                            for x in ('_vs_default', '_lo', '_hi')}})
    return pd.DataFrame(rows)


def read_order(params:str)->dict:
    "The system stage's outputs of one parameter file: choices, transfer per step, rules, system vs every technique"
    exp = resolve_params('experiment', params)
    d = experiment_dir(exp)/'system'
    s = json.loads((d/'system.json').read_text())
    chain, cands = read_csv_safe(d/'chain.csv'), read_csv_safe(d/'system_candidates.csv')
    vs = read_csv_safe(d/'system_vs_techniques.csv')
    n = s['numbers']
    return {'params': params, 'experiment': exp.experiment, 'sets': s['sets'], 'choices': s['choices'],
            'system': {k: n[k] for k in ('mean_class_err', 'lo', 'hi')}, 'vs_baseline': n['vs_baseline'],
            'transfer': transfer_table(chain), 'rules': rule_rows(cands), 'vs_techniques': vs}


def order_hits(params:str)->dict:
    "Technique name -> PairedHits (technique, system) on this order's reporting images, against the system's target"
    from aliprod.data import load_index
    from aliprod.metrics import paired_hits
    from aliprod.predictions import read_topk
    from aliprod.system import evaluation_sets, pool_candidates, report_target
    exp = resolve_params('experiment', params)
    d = experiment_dir(exp)/'system'
    s = json.loads((d/'system.json').read_text())
    index = load_index(exp, 0)
    sets = evaluation_sets(index, exp.seed)
    system = read_topk(d/'predictions'/'report.parquet')
    y = report_target(index, system.rows, s['numbers']['target'])
    return {c.name: paired_hits(c.report, system, clean_label=report_target(index, c.report.rows, s['numbers']['target']),
                                names=(c.name, 'system'))
            for c in pool_candidates(exp, sets, int(s['recipe'].get('k', 10))) if c.report is not None
            and len(c.report.rows) == len(y)}


def pooled(params:list[str], B:int=10_000)->pd.DataFrame:
    "Both orders together: system − technique on every val image (each judged by the system chosen without it)"
    from dataclasses import replace
    from aliprod.metrics import paired_bootstrap, holm
    hits = [order_hits(f) for f in params]
    rows = []
    for name in sorted(set.intersection(*[set(h) for h in hits])):
        hs = [h[name] for h in hits]
        cat = replace(hs[0], **{k: np.concatenate([getattr(h, k) for h in hs]) for k in ('rows', 'y', 'hit_a', 'hit_b')},
                      n_unknown=sum(h.n_unknown for h in hs))
        d = paired_bootstrap(cat, B=B, seed=0)
        rows.append({'technique': name, 'images': len(cat), 'technique_mean_class_err': d.a, 'system_mean_class_err': d.b,
                     'Δ (system − technique)': d.delta, 'Δ lo': d.lo, 'Δ hi': d.hi, 'verdict': d.verdict, 'p': d.p})
    t = pd.DataFrame(rows)
    if len(t): t['p (Holm)'] = holm(t['p'].to_numpy(float))
    return t


def _iv(d, lo, hi)->str: return '' if d != d else f"{100*d:+.1f} [{100*lo:+.1f}, {100*hi:+.1f}]"


def _counts(t:pd.DataFrame)->str:
    "How many techniques the system is below: by the point estimate, with an interval, after Holm"
    d, hi = t['Δ (system − technique)'].to_numpy(float), t['Δ hi'].to_numpy(float)
    holm_below = int(((t['p (Holm)'] < 0.05) & (d < 0)).sum())
    return (f"below {int((d < 0).sum())} (point), with an interval excluding 0 {int((hi < 0).sum())}, Holm p < 0.05 "
            f"and below {holm_below}; below every one with an interval: {bool(len(t)) and bool((hi < 0).all())}")


def _table(header:list[str], rows:list[list])->None:
    "Print a Markdown table (text columns left, numbers right)"
    print('\n| ' + ' | '.join(header) + ' |\n|' + '|'.join('---' if i < 2 else '---:' for i in range(len(header))) + '|')
    for r in rows: print('| ' + ' | '.join(str(x) for x in r) + ' |')


def _vs_rows(t:pd.DataFrame, first:str)->list[list]:
    "Rows of a system-vs-techniques table, the lowest technique error first"
    second = 'system_mean_class_err' if first == 'technique_mean_class_err' else 'technique_mean_class_err'
    return [[r.technique, f"{100*getattr(r, first):.1f}", f"{100*getattr(r, second):.1f}", _iv(r[4], r[5], r[6]), f"{r[9]:.3f}"]
            for r in t.sort_values('technique_mean_class_err').itertuples(index=False)]


def show(o:dict):
    "Print one order's tables (points of mean class error)"
    s, c, m = o['sets'], o['choices'], o['system']
    print(f"\n## {o['experiment']} ({o['params']}): {s['choose_images']} choosing, {s['report_images']} reporting images")
    print(f"system: mean class error {100*m['mean_class_err']:.1f} [{100*m['lo']:.1f}, {100*m['hi']:.1f}] on the reporting "
          f"images; choices: round {c['round']}, method {c['method']}, τ {c['tau']:g}, TTA {'yes' if c['tta'] else 'no'}, "
          f"{len(c['members'])} member(s)")
    _table(['step', 'system', 'Δ choosing [95%]', 'Δ reporting [95%]', 'transferred'],
           [[r.step, r.system, _iv(r[2], r[3], r[4]), _iv(r[5], r[6], r[7]), r.transferred]
            for r in o['transfer'].itertuples(index=False)])
    rows = []
    for r in o['rules'].itertuples(index=False):
        dc = _iv(r.choose_Δ_vs_default, r.choose_Δ_lo, r.choose_Δ_hi)
        dr = _iv(r.report_Δ_vs_default, r.report_Δ_lo, r.report_Δ_hi)
        rows.append([r.step, r.rule, f"{r.candidate} ({r.candidates})", 'default' if r.default else dc or 'no default',
                     'default' if r.default else dr or 'not predicted'])
    _table(['step', 'rule', 'candidate (of n)', 'Δ choosing vs default', 'Δ reporting vs default'], rows)
    v = o['vs_techniques']
    print(f"\nsystem − technique on the reporting images, {len(v)} single techniques: {_counts(v)}")
    _table(['technique', 'its error (choosing)', 'its error (reporting)', 'Δ system − technique [95%]', 'Holm p'],
           _vs_rows(v, 'choose_mean_class_err'))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--params', nargs='+', default=PARAMS, help='parameter files, one per order of the halves')
    ap.add_argument('--no-run', action='store_true', help='read the runs as they are (no aliprod run)')
    ap.add_argument('--bootstrap', type=int, default=10_000, help='draws of the both-orders intervals')
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'transfer.json'))
    a = ap.parse_args(argv)
    if not a.no_run:
        from aliprod.pipeline import run_pipeline
        for f in a.params: run_pipeline(f, in_process=True)
    orders = [read_order(f) for f in a.params]
    for o in orders: show(o)
    same = [k for k in ('round', 'method', 'tau', 'tta', 'members')
            if len({json.dumps(o['choices'][k]) for o in orders}) == 1]
    print(f"\nchoices equal in every order: {', '.join(same) or 'none'}")
    both = pooled(a.params, a.bootstrap) if len(a.params) > 1 else pd.DataFrame()
    if len(both):
        print(f"\n## both orders: every val image reports once ({int(both['images'].iloc[0])} images), "
              f"{len(both)} techniques in both")
        print(f"system {_counts(both)}")
        _table(['technique', 'its error', 'system error', 'Δ system − technique [95%]', 'Holm p'],
               _vs_rows(both, 'technique_mean_class_err'))
    records = lambda v: v.to_dict('records') if isinstance(v, pd.DataFrame) else v
    atomic_write_json(a.out, {'params': a.params, 'orders': [{k: records(v) for k, v in o.items()} for o in orders],
                              'same_choices': same, 'both_orders_vs_techniques': both.to_dict('records')})
    print(f"\nwrote {a.out}")


if __name__ == '__main__': main()
