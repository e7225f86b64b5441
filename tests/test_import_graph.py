"""The package's import graph, read from the modules' source (every import of an aliprod module, at the top or inside a
function): no circles, imports only go down the layers (core, library, methods, stages, entry points), and an import inside a
function says why on its line (`# local import: <why>`). Reads files only: no module is imported."""
import ast
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'aliprod'

# The layers, lowest first (DESIGN.md, "Layers"): a module may import modules of its own layer or of a lower one.
LAYERS = {
    'core':     ('core', 'escape'),                               # project root, seeding, devices, log, notebook run kind
    'config':   ('config',),                                      # parameters: sections, files, StageConfig
    'rundirs':  ('rundirs',),                                     # run dirs: atomic writes, fingerprints, StageRun, lock
    'library':  ('schema', 'predictions', 'metrics', 'samplers', 'images', 'launch'),  # tables, top-k, metrics, torchrun
    'methods':  ('models', 'losses', 'decoupled', 'inference', 'callbacks', 'synthetic', 'noise'),          # arrays in, arrays out
    # deploy (the delivered system's prediction) imports the model loader from train, the views from tta and the top-k
    # average from ensemble: a stage until those move below it
    'stages':   ('data', 'train', 'finegrained', 'clean', 'rebalance', 'tta', 'ensemble', 'deploy', 'system', 'report'),
    'entry':    ('pipeline', 'worker'),                                          # the aliprod command, the torchrun worker
    'explore':  ('explore',),                                        # reads a run: every stage's outputs, `run_status`
}
RANK = {m: r for r, mods in enumerate(LAYERS.values()) for m in mods}
WHY = '# local import:'


def modules(pkg:Path=PKG)->list[str]:
    "The package's modules (aliprod/*.py but the generated index and __init__)"
    return sorted(p.stem for p in pkg.glob('*.py') if not p.stem.startswith('_'))


def imports(module:str, pkg:Path=PKG)->list[tuple[str, int, bool]]:
    "(imported aliprod module, line, at the top of the module?) for every import of an aliprod module in `module`'s source"
    known, src = set(modules(pkg)), (pkg/f'{module}.py').read_text()
    tree = ast.parse(src)
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level == 1: names = [base.split('.')[0]] if base else [a.name for a in node.names]
            elif base.startswith('aliprod.'): names = [base.split('.')[1]]
            elif base == 'aliprod': names = [a.name for a in node.names]
            else: names = []
        elif isinstance(node, ast.Import): names = [a.name.split('.')[1] for a in node.names if a.name.startswith('aliprod.')]
        else: continue
        out += [(n, node.lineno, id(node) in top) for n in names if n in known]
    return out


def graph(pkg:Path=PKG)->dict[str, set[str]]:
    "module -> the aliprod modules it imports anywhere in its source"
    return {m: {t for t, _, _ in imports(m, pkg)} - {m} for m in modules(pkg)}


def cycles(g:dict[str, set[str]])->list[list[str]]:
    "One circle through each strongly connected group of more than one module (Tarjan), as [a, b, ..., a]"
    index, low, stack, on, groups = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index); stack.append(v); on.add(v)
        for w in sorted(g[v]):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            grp = set()
            while True:
                w = stack.pop(); on.discard(w); grp.add(w)
                if w == v: break
            if len(grp) > 1: groups.append(grp)
    for v in sorted(g):
        if v not in index: visit(v)
    out = []
    for grp in groups:   # the shortest way from the group's first module back to it (breadth first)
        start = min(grp); prev, todo = {}, [start]
        while start not in prev:
            v = todo.pop(0)
            for w in sorted(g[v] & grp):
                if w not in prev: prev[w] = v; todo.append(w)
        path = [start]
        while len(path) == 1 or path[-1] != start: path.append(prev[path[-1]])
        out.append(path[::-1])
    return out


def test_cycles_found():
    "The circle finder itself: it names a circle and passes a chain"
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
    assert cycles({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) == []


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m not in RANK]
    assert not missing, f"aliprod/{missing[0]}.py is in no layer: add it to LAYERS in tests/test_import_graph.py"
    gone = [m for m in RANK if m not in modules()]
    assert not gone, f"LAYERS names {gone} but aliprod/ has no such module: remove it from LAYERS"


def test_no_cycles():
    found = cycles(graph())
    assert not found, "import circles: " + '; '.join(' -> '.join(c) for c in found)


def test_imports_go_down_the_layers():
    names = list(LAYERS)
    up = [f"aliprod/{m}.py:{line} ({names[RANK[m]]}) imports {t} ({names[RANK[t]]})"
          for m in modules() if m in RANK for t, line, _ in imports(m) if t in RANK and RANK[t] > RANK[m]]
    assert not up, "imports that go up a layer: " + '; '.join(up)


def test_local_imports_say_why():
    bare = []
    for m in modules():
        lines = (PKG/f'{m}.py').read_text().split('\n')
        bare += [f"aliprod/{m}.py:{line} imports {t}" for t, line, at_top in imports(m)
                 if not at_top and WHY not in lines[line - 1] and WHY not in lines[line - 2]]
    assert not bare, (f"{len(bare)} imports inside functions without a '{WHY} <why>' comment on their line or the one "
                      "above (move them to the top of the module or say why they stay): " + '; '.join(bare))


def closure(module:str, g:dict[str, set[str]])->set[str]:
    "`module` and every module it imports, directly or not"
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen: seen.add(m); todo.extend(g[m] - seen)
    return seen


def test_stage_code_covers_config_and_rundirs():
    "A stage's key hashes the code it imports (`rundirs.code_version`): every stage reaches config and rundirs"
    g = graph()
    missing = [f"aliprod/{m}.py does not reach {sorted({'core', 'config', 'rundirs'} - closure(m, g))}"
               for m in LAYERS['stages'] if {'core', 'config', 'rundirs'} - closure(m, g)]
    assert not missing, "an edit there would not make the stage stale: " + '; '.join(missing)
