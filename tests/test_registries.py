"""The README's and index.ipynb's lists of named variants come from the registries (#22): a rule, method, source or TTA
view registered in code but missing from the docs fails here, with the block to paste."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = '<!-- named variants: generated from the registries; tests/test_registries.py checks it -->'


def named_variants_block()->str:
    "The README table of every registered name, one row per registry"
    from aliprod.noise import RULE_REGISTRY
    from aliprod.decoupled import METHOD_REGISTRY
    from aliprod.schema import SOURCES
    from aliprod.tta import VIEW_REGISTRY
    def names(d, note=lambda k: ''): return ', '.join(f'`{k}`{note(k)}' for k in d)
    need = lambda k: f" ({', '.join(RULE_REGISTRY[k].needs)})" if RULE_REGISTRY[k].needs else ''
    ft = lambda k: ' (finetune)' if METHOD_REGISTRY[k].finetune else ''
    rows = [('cleaning rules', '`clean: rules`', '`aliprod.noise.register_rule`', names(RULE_REGISTRY, need)),
            ('rebalance methods', '`rebalance: methods`', '`aliprod.decoupled.register_method`', names(METHOD_REGISTRY, ft)),
            ('data sources', '`data: source`', '`aliprod.schema.SOURCES`', names(SOURCES)),
            ('TTA views', '`tta: views`, `compare` (`<views>@<enlarge>`)', '`aliprod.tta.register_view`', names(VIEW_REGISTRY))]
    return '\n'.join([MARK, '| variant | parameter | registry | names |', '|---|---|---|---|',
                      *(f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows)])


def test_readme_lists_every_registered_name():
    block = named_variants_block()
    assert block in (ROOT/'README.md').read_text(), f"README.md's named-variants table is stale; paste:\n\n{block}\n"


def test_index_notebook_names_every_rule_and_method():
    from aliprod.noise import RULE_REGISTRY
    from aliprod.decoupled import METHOD_REGISTRY
    text = ''.join(''.join(c['source']) for c in json.loads((ROOT/'nbs'/'index.ipynb').read_text())['cells'])
    missing = [n for n in (*RULE_REGISTRY, *METHOD_REGISTRY) if f'`{n}`' not in text]
    assert not missing, f"nbs/index.ipynb does not name {missing}: add them to the 03_clean / 04_rebalance rows"
