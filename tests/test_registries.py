"""The README's and index.ipynb's lists of named variants come from the registries (#22): scripts/named_variants.py
writes them (`make check-sync` runs it), so registering a rule, method, source or TTA view is the only edit."""
import importlib.util, json
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('named_variants', ROOT/'scripts'/'named_variants.py')
nv = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(nv)


def test_the_lists_are_current(capsys):
    assert nv.main(['--check']) == 0, capsys.readouterr().out


def test_a_newly_registered_rule_is_written_into_both_lists():
    from aliprod.noise import register_rule, rule_scope, RuleResult
    readme, index = (ROOT/'README.md').read_text(), json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    with rule_scope():
        @register_rule('margin_probe', needs=('embeddings',))
        def _probe(t): return RuleResult(np.zeros(len(t), bool))
        regs = nv.registries()
    new_r = nv.new_readme(readme, regs)
    new_i = ''.join(''.join(c['source']) for c in nv.new_index(index, regs)['cells'])
    assert '`h2e` (embeddings), `margin_probe` (embeddings) |' in new_r
    assert '`margin_probe` (embeddings)' in new_i
    # only the lists change: the README keeps every other line, the index every other cell
    assert len(new_r.split('\n')) == len(readme.split('\n'))
    assert [l for l in new_r.split('\n') if 'margin_probe' not in l] == [l for l in readme.split('\n') if '`h2e`' not in l]
    assert 'margin_probe' not in ''.join(''.join(c['source']) for c in nv.new_index(index, nv.registries())['cells'])


def test_index_notebook_has_a_row_for_every_notebook():
    text = ''.join(''.join(c['source']) for c in json.loads((ROOT/'nbs'/'index.ipynb').read_text())['cells'])
    missing = [p.stem for p in sorted((ROOT/'nbs').glob('[0-9][0-9]*.ipynb')) if f'| `{p.stem}` |' not in text]
    assert not missing, f"nbs/index.ipynb has no row for {missing}"


def stage_notebook_rule(names:list[str], stages:dict)->list[str]:
    """What breaks the naming rule: `NN_<name>` (two digits, no letter) is a stage's notebook (`stages`: stage name ->
    its notebook or None) or the runner `08_pipeline`; a library, method or entry module is `NN<letter>_<module>`."""
    import re
    bad = []
    for n in names:
        m = re.fullmatch(r'(\d\d)([a-z]?)_(\w+)\.ipynb', n)
        if not m: bad.append(f'{n}: not NN_<name> or NN<letter>_<name>'); continue
        plain, name = not m.group(2), m.group(3)
        if plain and name not in stages and n != '08_pipeline.ipynb':
            bad.append(f'{n}: a plain number, but {name!r} is not a stage')
        if not plain and name in stages: bad.append(f'{n}: stage {name!r} behind a letter')
    for s, nb in stages.items():
        if nb is not None and not re.fullmatch(rf'\d\d_{s}\.ipynb', nb): bad.append(f'stage {s}: notebook {nb}')
    return bad


def test_notebook_names_tell_stages_from_libraries():
    from aliprod.pipeline import STAGES
    stages = {s.name: s.notebook for s in STAGES}
    names = sorted(p.name for p in (ROOT/'nbs').glob('[0-9][0-9]*.ipynb'))
    assert stage_notebook_rule(names, stages) == []
    assert {s for s, nb in stages.items() if nb} <= {n.split('_', 1)[1].removesuffix('.ipynb') for n in names}
    # the rule can fail: the names before the rename (#22) break it three ways
    assert stage_notebook_rule(['00_core.ipynb', '02b_finegrained.ipynb', '06b_system.ipynb'],
                               {'finegrained': '02b_finegrained.ipynb', 'system': '06b_system.ipynb'}) == [
        "00_core.ipynb: a plain number, but 'core' is not a stage",
        "02b_finegrained.ipynb: stage 'finegrained' behind a letter", "06b_system.ipynb: stage 'system' behind a letter",
        'stage finegrained: notebook 02b_finegrained.ipynb', 'stage system: notebook 06b_system.ipynb']
