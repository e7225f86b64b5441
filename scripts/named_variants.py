"""The lists of named variants in README.md and nbs/index.ipynb, written from the registries (#22): registering a
cleaning rule, rebalance method, data source or TTA view is the only edit; `make check-sync` (part of `make test`)
rewrites the lists and fails when they were stale, as it does for a notebook not exported.

    python scripts/named_variants.py           # rewrite README.md and nbs/index.ipynb where stale; list what changed
    python scripts/named_variants.py --check   # change nothing; exit 1 naming the stale file
"""
from __future__ import annotations
import argparse, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = '<!-- named variants: generated from the registries by scripts/named_variants.py (make check-sync) -->'


def _names(d, note=lambda k: '')->str: return ', '.join(f'`{k}`{note(k)}' for k in d)


def registries()->dict:
    "registry label -> (its names as markdown, parameter, registering name)"
    from aliprod.noise import RULE_REGISTRY
    from aliprod.decoupled import METHOD_REGISTRY
    from aliprod.schema import SOURCES
    from aliprod.tta import VIEW_REGISTRY
    need = lambda k: f" ({', '.join(RULE_REGISTRY[k].needs)})" if RULE_REGISTRY[k].needs else ''
    ft = lambda k: ' (finetune)' if METHOD_REGISTRY[k].finetune else ''
    return {'cleaning rules': (_names(RULE_REGISTRY, need), '`clean: rules`', '`aliprod.noise.register_rule`'),
            'rebalance methods': (_names(METHOD_REGISTRY, ft), '`rebalance: methods`', '`aliprod.decoupled.register_method`'),
            'data sources': (_names(SOURCES), '`data: source`', '`aliprod.schema.SOURCES`'),
            'TTA views': (_names(VIEW_REGISTRY), '`tta: views`, `compare` (`<views>@<enlarge>`)', '`aliprod.tta.register_view`')}


def readme_block(regs:dict)->str:
    "The README table of every registered name, one row per registry, under its marker line"
    return '\n'.join([MARK, '| variant | parameter | registry | names |', '|---|---|---|---|',
                      *(f'| {k} | {p} | {r} | {n} |' for k, (n, p, r) in regs.items())])


def new_readme(text:str, regs:dict)->str:
    "README.md's text with the block rewritten (the marker line and the table rows under it)"
    lines = text.split('\n')
    at = [i for i, l in enumerate(lines) if l.startswith('<!-- named variants:')]
    if len(at) != 1: raise SystemExit(f"README.md: expected one '<!-- named variants: ...' marker line, found {len(at)}")
    end = at[0] + 1
    while end < len(lines) and lines[end].startswith('|'): end += 1
    return '\n'.join([*lines[:at[0]], readme_block(regs), *lines[end:]])


# the index rows' lists: "rules (`register_rule`): `a`, `b` (x)" up to the next ';' or ' |'
INDEX_LISTS = {'cleaning rules': 'rules (`register_rule`): ', 'rebalance methods': 'methods (`register_method`): '}


def new_index(nb:dict, regs:dict)->dict:
    "nbs/index.ipynb with its rule and method lists rewritten"
    for key, lead in INDEX_LISTS.items():
        pat = re.compile(re.escape(lead) + r'[^;|]*?(?=;| \|)')
        hits = 0
        for c in nb['cells']:
            src = ''.join(c['source'])
            new, n = pat.subn(lambda m: lead + regs[key][0], src)
            hits += n
            if n: c['source'] = new.splitlines(True) + ([''] if c['source'] and c['source'][-1] == '' else [])
        if hits != 1: raise SystemExit(f"nbs/index.ipynb: expected one '{lead}...' list, found {hits}")
    return nb


def main(argv=None)->int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--check', action='store_true', help='change nothing; exit 1 when a list is stale')
    a = ap.parse_args(argv)
    regs = registries()
    readme, index = ROOT/'README.md', ROOT/'nbs'/'index.ipynb'
    old_r, old_i = readme.read_text(), index.read_text()
    new_r = new_readme(old_r, regs)
    new_i = json.dumps(new_index(json.loads(old_i), regs), indent=1, ensure_ascii=False) + '\n'
    stale = [p for p, o, n in ((readme, old_r, new_r), (index, old_i, new_i)) if o != n]
    if a.check:
        for p in stale: print(f"{p.relative_to(ROOT)}: the named-variant lists are stale; run python scripts/named_variants.py")
        return 1 if stale else 0
    for p, o, n in ((readme, old_r, new_r), (index, old_i, new_i)):
        if o != n: p.write_text(n); print(f"named_variants: rewrote {p.relative_to(ROOT)}")
    return 0


if __name__ == '__main__': sys.exit(main())
