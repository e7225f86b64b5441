"""Noise detection of every cleaning rule alone, by class-size band, on a run's own training predictions: the demo (or
any experiment with ground truth: the synthetic data knows which labels are noisy). No training: it reads
runs/<exp>/train/<iteration>/predictions/train.parquet and the index, flags with each rule at the parameter file's
thresholds, and prints precision / recall / F1 overall and for the many-, medium- and few-shot classes.

    python benchmarks/clean_rules.py                         # params/demo.yaml, after make demo
    python benchmarks/clean_rules.py --params params/demo.yaml --iteration 0 --out benchmarks/results/clean_rules_demo.json
"""
from __future__ import annotations
import argparse
from pathlib import Path
import pandas as pd, pyarrow.parquet as pq

from aliprod.core import project_root
from aliprod.config import resolve_params
from aliprod.rundirs import atomic_write_json, experiment_dir
from aliprod.clean import rule_detection, class_bands
from aliprod.data import load_index
from aliprod.predictions import read_topk


def rule_table(exp, clean, iteration:int=0)->pd.DataFrame:
    "One row per rule (and band): flagged, precision, recall, F1 against the ground truth of the index (aliprod.clean.rule_detection)"
    f = experiment_dir(exp)/'train'/str(iteration)/'predictions'/'train.parquet'
    t = read_topk(f, feats='feats' in pq.read_schema(f).names)   # with embeddings (train: save_feats), the prototype and h2e rules too
    index = load_index(exp, iteration)
    train = index[index['split'] == 'train']
    return rule_detection(t.take(t.labels >= 0), train, clean, class_bands(exp)).drop(columns='in_use')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--params', default=str(project_root()/'params'/'demo.yaml'))
    ap.add_argument('--iteration', type=int, default=0, help='the model whose training predictions are judged (its index is the input)')
    ap.add_argument('--out', default=str(project_root()/'benchmarks'/'results'/'clean_rules.json'))
    a = ap.parse_args(argv)
    exp, clean = resolve_params('experiment', a.params), resolve_params('clean', a.params)
    table = rule_table(exp, clean, a.iteration)
    print(f"noise detection by rule on {exp.experiment}'s iteration-{a.iteration} training predictions (conf_threshold {clean.conf_threshold}, robust_z {clean.robust_z})\n")
    print('| rule | band | images | noisy | flagged | precision | recall | F1 |\n|---|---|---:|---:|---:|---:|---:|---:|')
    for r in table.itertuples(index=False):
        print(f"| {r.rule} | {r.band} | {r.n} | {r.noisy} | {r.flagged} | {r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |")
    atomic_write_json(a.out, {'params': a.params, 'iteration': a.iteration, 'rows': table.to_dict('records')})
    print(f"\nwrote {a.out}")


if __name__ == '__main__': main()
