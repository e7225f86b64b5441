"The `aliprod` command, the parameter files and the stage notebooks' papermill contract"
import json, subprocess, sys, tomllib
from pathlib import Path
import nbformat, pytest
from aliprod.core import project_root, load_params_file, STAGE_RUN_MARKER
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
from aliprod.core import resolve_params, run_dir, StageRun
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


@pytest.mark.parametrize('stage', [s.name for s in STAGES])
def test_stage_notebook_layout(stage):
    "The guard comes before any code that does work, the parameters cell carries the marker, nothing below it tests or changes state"
    above, params, below = _split_at_parameters(stage_notebooks()[stage])
    code = [c for c in above if c.cell_type == 'code' and c.source.strip()]
    assert code[0].source.startswith('#| default_exp'), f'{stage}: first code cell should name the module'
    assert GUARD in code[1].source, f'{stage}: the second code cell must call {GUARD}'
    assert params.source.startswith(STAGE_RUN_MARKER), f'{stage}: the parameters cell must start with {STAGE_RUN_MARKER!r}'
    assert not any(c.source.lstrip().startswith(STAGE_RUN_MARKER) for c in code[2:]), f'{stage}: a cell above parameters starts with the marker'
    for c in below:
        if c.cell_type != 'code': continue
        for bad in ('test_eq(', 'test_fail(', 'assert ', 'set_num_threads', 'os.environ[', 'skip_to_stage_run'):
            assert bad not in c.source, f'{stage}: {bad!r} in a cell a stage run executes: {c.source[:80]}'


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


def test_nbdev_test_runs_every_cell(tmp_path):
    _marker_nb(tmp_path)
    r = subprocess.run([str(Path(sys.executable).parent/'nbdev-test'), str(tmp_path/'x.ipynb')], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path/'test_cell').exists() and (tmp_path/'stage_cell').exists()


def test_stage_list_is_declared_once():
    "STAGES is the one list: every stage notebook (a notebook with a parameters cell) is declared, and the README names each"
    declared = {s.notebook for s in STAGES}
    with_params = {nb.name for nb in (ROOT/'nbs').glob('*.ipynb')
                   if any('parameters' in c.get('metadata', {}).get('tags', []) for c in nbformat.read(nb, as_version=4).cells)}
    assert with_params == declared, (with_params, declared)
    readme = (ROOT/'README.md').read_text()
    for s in STAGES: assert f'| {s.name} (`{s.notebook.removesuffix(".ipynb")}`)' in readme, f'README stage table lacks {s.name}'


# --- the code fingerprint follows the import graph -----------------------------------------------------------------

def test_code_fingerprint_follows_imports(tmp_path):
    "A change to a module a stage imports (and only then) changes the stage's code version"
    import shutil
    shutil.copytree(ROOT/'aliprod', tmp_path/'aliprod')
    (tmp_path/'pyproject.toml').write_text('[tool.nbdev]\nlib_name = "aliprod"\n')
    probe = "from aliprod.core import code_version; print(code_version(['clean'])['source_sha256'])"
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
