"The `aliprod` command, the parameter files and the stage notebooks' papermill contract"
import ast, json, subprocess, sys, tomllib
from pathlib import Path
import nbformat, pytest
from aliprod.core import project_root, STAGE_RUN_MARKER
from aliprod.config import load_params_file
from aliprod.pipeline import main, run_pipeline, stage_notebooks, StageFailed, STAGES

ROOT = project_root()
PARAM_FILES = sorted((ROOT/'params').glob('*.yaml'))


@pytest.mark.parametrize('path', PARAM_FILES, ids=lambda p: p.name)
def test_param_files_validate(path):
    "Every shipped parameter file passes validation of every section, aliproducts.yaml included"
    cfg = load_params_file(path)
    assert cfg['experiment']['experiment'] == path.stem


def test_param_files_present():
    assert {'smoke.yaml', 'demo.yaml', 'aliproducts.yaml'} <= {p.name for p in PARAM_FILES}


def test_misspelt_key_refused(tmp_path):
    bad = tmp_path/'bad.yaml'
    bad.write_text('experiment: bad\ndata:\n  n_clases: 10\n')
    r = subprocess.run([str(Path(sys.executable).parent/'aliprod'), 'check', str(bad)], capture_output=True, text=True)
    assert r.returncode == 2, r
    assert "Unknown key 'n_clases'" in r.stderr and 'bad.yaml [data]' in r.stderr and "Did you mean 'n_classes'?" in r.stderr


def test_bad_type_refused(tmp_path):
    bad = tmp_path/'bad.yaml'
    bad.write_text('experiment: bad\nseed: one\n')
    assert main(['check', str(bad)]) == 2


def test_stage_notebooks_have_parameters_cell():
    "papermill reads the cell *metadata* tag; without it -p is silently ignored"
    nbs = stage_notebooks()
    assert 'train' in nbs
    for stage, nb in nbs.items():
        cells = nbformat.read(nb, as_version=4).cells
        tagged = [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
        assert len(tagged) == 1, f'{nb.name}: {len(tagged)} cells tagged parameters'
        assert 'params_file' in tagged[0].source, f'{nb.name}: parameters cell lacks params_file'


def test_nbdev_keeps_tags():
    "nbdev-clean deletes cell metadata not listed here, papermill's tag included"
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text())['tool']['nbdev']
    assert 'tags' in cfg['allowed_cell_metadata_keys']


def _nb(cells):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_code_cell('params_file = None', metadata={'tags': ['parameters']}),
                *map(nbformat.v4.new_code_cell, cells)]
    return nb


TRAIN_LIKE = """
from aliprod.config import resolve_params
from aliprod.rundirs import run_dir, StageRun
exp = resolve_params('experiment', params_file, overrides={'experiment': experiment})
out = run_dir(exp, 'train', 0)
run = StageRun(out, 'train', {'x': 1}, modules=['core'])
if not run.up_to_date():
    (out/'model.txt').write_text('weights')
    open(params_file + '.train_runs', 'a').write('x')
    run.finish(['model.txt'])
"""


def test_broken_stage_names_stage_and_cell_then_resumes(tmp_path, capsys):
    "A broken stage stops the run non-zero naming stage and cell; after the fix the stages before it are skipped"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    nbformat.write(_nb([TRAIN_LIKE]), nbs/'02_train.ipynb')
    nbformat.write(_nb(['x = 1', "raise ValueError('deliberately broken')"]), nbs/'03_clean.ipynb')
    p = tmp_path/'p.yaml'
    p.write_text(f"experiment: t\nruns_dir: {tmp_path/'runs'}\nreports_dir: {tmp_path/'reports'}\npipeline:\n  html: false\n")
    with pytest.raises(StageFailed) as e: run_pipeline(p, nbs_dir=nbs)
    msg = str(e.value)
    assert "Stage 'clean' failed in cell 3 `raise ValueError('deliberately broken')`: ValueError: deliberately broken" in msg
    assert str(tmp_path/'reports'/'t'/'notebooks'/'03_clean.ipynb') in msg
    assert (tmp_path/'p.yaml.train_runs').read_text() == 'x'
    nbformat.write(_nb(['x = 1']), nbs/'03_clean.ipynb')  # the fix
    capsys.readouterr()
    run_pipeline(p, nbs_dir=nbs)
    assert (tmp_path/'p.yaml.train_runs').read_text() == 'x', 'the train stage ran again'
    assert 'train: up to date, nothing recomputed' in capsys.readouterr().out


def test_cli_exit_code_on_failure(tmp_path):
    "`aliprod run` exits non-zero on a bad parameter file, before running anything"
    bad = tmp_path/'bad.yaml'
    bad.write_text('experiment: t\npipeline:\n  stages: [train, cleen]\n')
    r = subprocess.run([str(Path(sys.executable).parent/'aliprod'), 'run', str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Unknown stage 'cleen'" in r.stderr, r.stderr


# --- a stage run executes only the stage ---------------------------------------------------------------------------

GUARD = 'skip_to_stage_run()'


def _split_at_parameters(nb_path):
    cells = nbformat.read(nb_path, as_version=4).cells
    i = next(i for i, c in enumerate(cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
    return cells[:i], cells[i], cells[i + 1:]


# What may stand below `parameters`, the cells a stage run executes: imports of the stage function, `resolve_params`
# and IPython's display helpers; assignments of their results to plain names; `if`/`for` over what they return; and
# expressions that show it. Every call is one of these names or a read-only method; nothing else (no assert, no thread
# or environment setting, no writing, no deleting) can run inside a user's run.
BELOW_CALLS = {'call_stage', 'resolve_params', 'display', 'Image', 'Markdown', 'print', 'str', 'dict'}
BELOW_METHODS = {'get', 'round', 'values', 'items', 'keys', 'join'}
BELOW_IMPORTS = {'IPython.display': {'Image', 'Markdown', 'display'}, 'aliprod.config': {'resolve_params'},
                 'aliprod.pipeline': {'call_stage'}}
BELOW_STATEMENTS = (ast.Import, ast.ImportFrom, ast.Assign, ast.Expr, ast.If, ast.For, ast.Pass)


def below_parameters_violations(source:str, stage_function:str)->list[str]:
    "What in `source` (a cell below `parameters`) a stage run must not execute, one line each; [] if all is allowed"
    import ast
    out, calls = [], BELOW_CALLS | {stage_function}
    imports = {**BELOW_IMPORTS, f'aliprod.{stage_function.removesuffix("_stage")}': {stage_function}}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and not isinstance(node, BELOW_STATEMENTS):
            out.append(f'{type(node).__name__} statement')
        if isinstance(node, ast.Import): out.append('import ' + ', '.join(a.name for a in node.names))
        if isinstance(node, ast.ImportFrom) and not {a.name for a in node.names} <= imports.get(node.module, set()):
            out.append(f'from {node.module} import ' + ', '.join(a.name for a in node.names))
        if isinstance(node, (ast.Assign, ast.For)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if not all(isinstance(n, (ast.Name, ast.Tuple, ast.expr_context)) for n in ast.walk(t)):
                    out.append(f'assignment to {ast.unparse(t)}')
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else None
            if not (name in calls or isinstance(f, ast.Attribute) and f.attr in BELOW_METHODS):
                out.append(f'call {ast.unparse(f)}()')
        if isinstance(node, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            out.append(type(node).__name__)
    return out


def test_below_parameters_allowlist_refuses():
    "The allowlist passes a stage's run cells and refuses each kind of thing a stage run must not execute"
    ok = ("from aliprod.config import resolve_params\nfrom aliprod.clean import clean_stage\n"
          "exp = resolve_params('experiment', params_file)\nart = clean_stage(exp)\nart.tables.get('x').round(4)\n"
          "for f in art.figures.values(): display(f)\nif art.tau is not None: print('τ', art.tau)")
    assert below_parameters_violations(ok, 'clean_stage') == []
    for bad in ('assert art.ok', "import os; os.environ['X'] = '1'", 'torch.set_num_threads(1)', 'test_eq(art, 1)',
                'from aliprod.train import train_stage', "art.x = 1", "d['k'] = 1", 'del art', 'x += 1',
                "shutil.rmtree('runs')", 'def f(): pass', 'with open(p) as f: pass', "open('x', 'w')",
                'while True: pass'):
        assert below_parameters_violations(bad, 'clean_stage'), f'the allowlist let through: {bad}'


@pytest.mark.parametrize('stage', [s.name for s in STAGES if s.notebook])
def test_stage_notebook_layout(stage):
    "The guard comes before any code that does work, the parameters cell carries the marker, below it the allowlist"
    above, params, below = _split_at_parameters(stage_notebooks()[stage])
    code = [c for c in above if c.cell_type == 'code' and c.source.strip()]
    assert code[0].source.startswith('#| default_exp'), f'{stage}: first code cell should name the module'
    assert GUARD in code[1].source, f'{stage}: the second code cell must call {GUARD}'
    assert params.source.startswith(STAGE_RUN_MARKER), f'{stage}: the parameters cell must start with {STAGE_RUN_MARKER!r}'
    assert not any(c.source.lstrip().startswith(STAGE_RUN_MARKER) for c in code[2:]), f'{stage}: a cell above parameters starts with the marker'
    stage_function = f"{code[0].source.split()[2]}_stage"
    for c in [params, *below]:
        if c.cell_type != 'code': continue
        bad = below_parameters_violations(c.source, stage_function)
        assert not bad, f'{stage}: a cell a stage run executes has {bad}: {c.source[:80]}'


def _marker_nb(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    mark = lambda name: f"open({str(tmp_path/name)!r}, 'w').write('ran')"
    nb.cells = [nbformat.v4.new_code_cell('#| default_exp x'),
                nbformat.v4.new_code_cell(f'from aliprod.core import skip_to_stage_run; {GUARD}'),
                nbformat.v4.new_code_cell(mark('test_cell')),
                nbformat.v4.new_code_cell(f'{STAGE_RUN_MARKER} of the stage\nparams_file = None', metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell(mark('stage_cell'))]
    nbformat.write(nb, tmp_path/'x.ipynb')


@pytest.mark.parametrize('with_parameters', [True, False])
def test_papermill_runs_only_the_stage(tmp_path, with_parameters):
    "papermill (with or without -p) skips the cells above parameters; the stage cells run"
    import papermill as pm
    _marker_nb(tmp_path)
    pm.execute_notebook(str(tmp_path/'x.ipynb'), str(tmp_path/'out.ipynb'), parameters={'params_file': 'p'} if with_parameters else None,
                        kernel_name='python3', progress_bar=False)
    assert (tmp_path/'stage_cell').exists() and not (tmp_path/'test_cell').exists()


def test_nbdev_test_runs_the_tests_not_the_stage(tmp_path):
    "nbdev-test runs every cell above `parameters` (the tests) and none from it on (the stage, which writes runs/)"
    _marker_nb(tmp_path)
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev-test'), str(tmp_path/'x.ipynb')], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path/'test_cell').exists() and not (tmp_path/'stage_cell').exists()


def _probe_stage_notebook(stage, tmp_path):
    "A copy of a real stage notebook with one cell after `parameters` that lists the kernel's names and stops the run"
    nb_path = stage_notebooks()[stage]
    nb = nbformat.read(nb_path, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.get('metadata', {}).get('tags', []))
    names = tmp_path/f'{stage}.names'
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
        f"open({str(names)!r}, 'w').write('\\n'.join(globals())); raise RuntimeError('probe: the stage is not run')"))
    python = lambda src: '\n'.join(l for l in src.splitlines() if not l.startswith(('%', '!')))   # no magics
    defined = {n.name for c in nb.cells[:i] if c.cell_type == 'code' for n in ast.parse(python(c.source)).body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert f'{stage}_stage' in defined, f'{stage}: the stage function is not defined above parameters'
    nbformat.write(nb, tmp_path/nb_path.name)
    return tmp_path/nb_path.name, names, defined


# the two ways the old switch (nbclient's in-memory history, outside IN_TEST) ran a user's run's tests, each on a real
# stage notebook (one kernel each, ~5 s; the layout test checks every stage notebook calls the same guard)
@pytest.mark.parametrize('stage, kernel_name, in_test', [('clean', 'python3', '1'), ('tta', 'aliprod-venv', None)])
def test_stage_run_skips_tests_whatever_the_kernel_and_environment(tmp_path, monkeypatch, stage, kernel_name, in_test):
    "papermill with IN_TEST=1 in the environment, or with a venv's kernel (not named python3), runs none of the tests"
    import papermill as pm
    kernel = tmp_path/'jupyter'/'kernels'/'aliprod-venv'; kernel.mkdir(parents=True)
    argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
    (kernel/'kernel.json').write_text(json.dumps({'argv': argv, 'display_name': 'aliprod', 'language': 'python'}))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path/'jupyter')); monkeypatch.delenv('ALIPROD_STAGE_RUN', raising=False)
    if in_test: monkeypatch.setenv('IN_TEST', in_test)
    else: monkeypatch.delenv('IN_TEST', raising=False)
    nb, names, defined = _probe_stage_notebook(stage, tmp_path)
    with pytest.raises(pm.PapermillExecutionError, match='probe: the stage is not run'):
        pm.execute_notebook(str(nb), str(tmp_path/'out.ipynb'), parameters={'params_file': 'p.yaml'},
                            kernel_name=kernel_name, progress_bar=False, cwd=str(ROOT))
    seen = set(names.read_text().split('\n'))
    assert 'skip_to_stage_run' in seen and 'params_file' in seen, f'{stage}: the guard or the parameters did not run'
    assert not defined & seen, f'{stage}: cells above parameters ran in a stage run: {sorted(defined & seen)[:5]}'


def test_run_kind_in_a_kernel():
    "A kernel whose requests allow stdin (a person at JupyterLab) runs every cell, unless aliprod run said: a stage run"
    from jupyter_client.manager import start_new_kernel
    from aliprod.pipeline import KERNEL_ARGUMENTS
    def kind(kc):
        kc.execute("from aliprod.core import notebook_run_kind; print(notebook_run_kind(), end='')", allow_stdin=True)
        out = []
        while True:
            m = kc.get_iopub_msg(timeout=60)
            if m['msg_type'] == 'stream': out.append(m['content']['text'])
            if m['msg_type'] == 'error': raise AssertionError(m['content'])
            if m['msg_type'] == 'status' and m['content']['execution_state'] == 'idle' and out: return ''.join(out)
    km, kc = start_new_kernel(kernel_name='python3', extra_arguments=KERNEL_ARGUMENTS)
    try:
        assert kind(kc) == 'stage', "aliprod run's kernel does not say it runs a stage"
        kc.execute("import os; del os.environ['ALIPROD_STAGE_RUN']")
        assert kind(kc) == 'interactive'
    finally:
        kc.stop_channels(); km.shutdown_kernel(now=True)


def test_stage_list_is_declared_once():
    "STAGES is the one list: every stage notebook (a numbered notebook with a parameters cell) is declared, and the README names each"
    declared = {s.notebook for s in STAGES if s.notebook}   # the data stage has none
    with_params = {nb.name for nb in (ROOT/'nbs').glob('*.ipynb')
                   if any('parameters' in c.get('metadata', {}).get('tags', []) for c in nbformat.read(nb, as_version=4).cells)}
    # numbered notebooks are the library and the stages; an unnumbered one with parameters is a walkthrough, not a stage
    assert {n for n in with_params if n[:2].isdigit()} == declared, (with_params, declared)
    assert {n for n in with_params if not n[:2].isdigit()} == {'explore.ipynb'}
    readme = (ROOT/'README.md').read_text()
    for s in STAGES:
        if s.notebook:
            assert f'| {s.name} (`{s.notebook.removesuffix(".ipynb")}`)' in readme, f'README stage table lacks {s.name}'


# --- the code fingerprint follows the import graph -----------------------------------------------------------------

def test_code_fingerprint_follows_imports(tmp_path):
    "A change to a module a stage imports (and only then) changes the stage's code version"
    import shutil
    shutil.copytree(ROOT/'aliprod', tmp_path/'aliprod')
    (tmp_path/'pyproject.toml').write_text('[tool.nbdev]\nlib_name = "aliprod"\n')
    probe = "from aliprod.rundirs import code_version; print(code_version(['clean'])['source_sha256'])"
    sha = lambda: subprocess.run([sys.executable, '-c', probe], cwd=tmp_path, capture_output=True, text=True,
                                 env={'PATH': '/usr/bin:/bin', 'PYTHONPATH': str(tmp_path), 'ALIPROD_ROOT': str(tmp_path)}).stdout.strip()
    base = sha(); assert len(base) == 64
    with open(tmp_path/'aliprod'/'report.py', 'a') as f: f.write('\n# the report is not imported by clean\n')
    assert sha() == base
    with open(tmp_path/'aliprod'/'train.py', 'a') as f: f.write('\nX_CHANGED = 1\n')
    assert sha() != base, 'clean calls train: a change there must make the clean stage stale'


# --- `aliprod check` checks values ------------------------------------------------------------------------------

@pytest.mark.parametrize('yaml_text, says', [
    ('train:\n  epochs: 0\n', 'epochs'),
    ('train:\n  arch: efficientnet_lite00\n', "did you mean 'efficientnet_lite0'?"),
    ('device: gpu\n', 'device must be auto, cpu'),
    ('data:\n  sibling_noise: 1.5\n', 'sibling_noise'),
    ('train:\n  eval_splits: [val, tset]\n', "'tset'"),
    ('experiment: ../../x\n', 'plain name'),
])
def test_check_refuses_bad_values(tmp_path, yaml_text, says):
    f = tmp_path/'bad.yaml'
    f.write_text(('' if yaml_text.startswith('experiment') else 'experiment: bad\n') + yaml_text)
    r = subprocess.run([str(Path(sys.executable).parent/'aliprod'), 'check', str(f)], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert says.lower() in r.stderr.lower() and 'Traceback' not in r.stderr, r.stderr


# --- the kernel dies with its runner -------------------------------------------------------------------------------

def test_kernel_dies_with_runner(tmp_path):
    "kill -9 of `aliprod run`: the stage's kernel goes at once and writes nothing after the kill"
    import os, signal, time
    nbs = tmp_path/'nbs'; nbs.mkdir()
    nbformat.write(_nb([f"import os, time; open({str(tmp_path/'kernel.pid')!r}, 'w').write(str(os.getpid())); time.sleep(4)",
                        f"open({str(tmp_path/'after_kill')!r}, 'w').write('written after the kill')"]), nbs/'02_train.ipynb')
    p = tmp_path/'p.yaml'
    p.write_text(f"experiment: k\nruns_dir: {tmp_path/'runs'}\nreports_dir: {tmp_path/'reports'}\npipeline:\n  html: false\n  stages: [train]\n")
    code = f"from aliprod.pipeline import run_pipeline; run_pipeline({str(p)!r}, nbs_dir={str(nbs)!r})"
    # the data stage of the default (synthetic smoke) data section runs first: a few seconds
    runner = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if (tmp_path/'kernel.pid').exists() and (tmp_path/'kernel.pid').read_text(): break
        time.sleep(0.1)
    pid = int((tmp_path/'kernel.pid').read_text())
    runner.send_signal(signal.SIGKILL); runner.wait()
    time.sleep(0.5)
    try: alive = open(f'/proc/{pid}/stat').read().split(')')[1].split()[0] not in ('Z', 'X')
    except FileNotFoundError: alive = False
    assert not alive, 'the kernel outlived its runner'
    time.sleep(4.5)
    assert not (tmp_path/'after_kill').exists()


# --- one stage interface: the notebook path and the in-process path are one function ------------------------------

def test_every_stage_is_one_function_of_its_config():
    "`call_stage` is a lookup: every STAGES entry names a `<name>_stage(cfg)`, and `call_stage` names no stage itself"
    import inspect
    from aliprod.pipeline import call_stage, stage_function
    for s in STAGES:
        f = stage_function(s.name)
        assert f.__name__ == f'{s.name}_stage' and list(inspect.signature(f).parameters) == ['cfg'], s
    consts = {n.value for n in ast.walk(ast.parse(inspect.getsource(call_stage))) if isinstance(n, ast.Constant)}
    assert not consts & {s.name for s in STAGES}, f'call_stage branches on a stage name: {consts}'


def test_notebook_and_in_process_runs_write_the_same_outputs(tmp_path):
    "The train stage run by papermill (its notebook's one-line run cell) and by `--in-process` writes the same files"
    import yaml
    from test_status import TINY   # a train stage of a few seconds
    # one folder for both runs (files that name their folder, params.json and the checkpoint, compare too), the
    # first run's train folder moved aside: the second reuses its data stage
    (tmp_path/'p.yaml').write_text(yaml.safe_dump({'experiment': 'same', 'seed': 0, 'runs_dir': str(tmp_path/'runs'),
                                                   'reports_dir': str(tmp_path/'reports'), **TINY}, sort_keys=False))
    train, manifests = tmp_path/'runs'/'same'/'train', {}
    for how in ('in-process', 'notebook'):
        executed = run_pipeline(tmp_path/'p.yaml', stages=['train'], in_process=how == 'in-process')
        if how == 'in-process':   # the artifacts' one shape: figures are PNG files by name, tables DataFrames by name
            figures = executed[0].figures
            assert 'history' in figures and all(Path(f).is_file() for f in figures.values()), figures
            assert 'metrics' in executed[0].tables
        manifests[how] = json.loads((train/'0'/'manifest.json').read_text())
        train.rename(tmp_path/f'train-{how}')
    a, b = manifests.values()
    assert a['params'] == b['params'], (a['params'], b['params'])
    assert a['outputs'] == b['outputs'], {k: (v, b['outputs'].get(k)) for k, v in a['outputs'].items()
                                          if b['outputs'].get(k) != v}


def test_a_needed_stage_runs_first_once(tmp_path, capsys):
    "`--stages clean` on a new experiment runs the train stage first (clean needs it); once train has run, only clean"
    nbs = tmp_path/'nbs'; nbs.mkdir()
    nbformat.write(_nb([TRAIN_LIKE]), nbs/'02_train.ipynb')
    nbformat.write(_nb(['x = 1']), nbs/'03_clean.ipynb')
    p = tmp_path/'p.yaml'
    p.write_text(f"experiment: t\nruns_dir: {tmp_path/'runs'}\nreports_dir: {tmp_path/'reports'}\n"
                 "pipeline:\n  html: false\n")
    run_pipeline(p, stages=['clean'], nbs_dir=nbs)
    assert (tmp_path/'p.yaml.train_runs').read_text() == 'x', 'the needed train stage did not run'
    assert 'stage 1/2 train (needed by clean)' in capsys.readouterr().out
    run_pipeline(p, stages=['clean'], nbs_dir=nbs)
    assert 'stage 1/2 train (needed by clean): has run, not run again' in capsys.readouterr().out


def test_call_stage_runs_the_needed_stages_first_and_a_stage_alone_names_them(tmp_path):
    """A stage function alone reads, never runs, its upstream stages: it names what is missing and the command that
    makes it; `call_stage` runs the needed stages first (data, then train, each as itself), then the stage; again:
    nothing recomputed"""
    import shutil, yaml
    from test_status import TINY   # a train stage of a few seconds
    from aliprod.pipeline import call_stage, stage_config, stage_function
    from aliprod.train import StageOutputMissing
    p = tmp_path/'p.yaml'
    p.write_text(yaml.safe_dump({'experiment': 'needs', 'seed': 0, 'runs_dir': str(tmp_path/'runs'),
                                 'reports_dir': str(tmp_path/'reports'), **TINY,
                                 'rebalance': {'methods': ['crt'], 'crt_epochs': 1, 'tau_grid': [0.0, 1.0]}},
                                sort_keys=False))
    runs, rebalance_stage = tmp_path/'runs'/'needs', stage_function('rebalance')
    with pytest.raises(StageOutputMissing, match=r"needs/data: no finished data stage.*`aliprod data <params.yaml>`"):
        rebalance_stage(stage_config('rebalance', p))
    call_stage('data', p)
    with pytest.raises(StageOutputMissing, match=r"needs/train/0: no trained model.*<params.yaml> --stages train"):
        rebalance_stage(stage_config('rebalance', p))
    assert not (runs/'train'/'0'/'manifest.json').exists() and not (runs/'rebalance').exists()
    shutil.rmtree(runs)   # a new experiment: no data, no train
    art = call_stage('rebalance', p)
    assert 'crt' in set(art.table['method'])
    m = {s: json.loads((runs/s/'manifest.json').read_text()) for s in ('data', 'train/0', 'rebalance/0')}
    # each needed stage ran as itself (its own config in its manifest, the train stage's report), before rebalance
    made_by = {s: m[s]['config']['stage'] for s in m}
    assert list(made_by.values()) == ['data', 'train', 'rebalance'], made_by
    assert (tmp_path/'reports'/'needs'/'train_0.png').is_file()
    assert m['data']['finished'] <= m['train/0']['finished'] <= m['rebalance/0']['finished']
    stamps = {s: (runs/s/'manifest.json').stat().st_mtime_ns for s in m}
    call_stage('rebalance', p)   # everything up to date: no stage recomputes
    assert {s: (runs/s/'manifest.json').stat().st_mtime_ns for s in m} == stamps
    with pytest.raises(StageOutputMissing, match=r"p\.yaml --stages train"):   # the running stage names its file
        call_stage('rebalance', p, needs=False, train={**TINY['train'], 'lr': 0.1})
