"The `aliprod` command, the parameter files and the stage notebooks' papermill contract"
import json, subprocess, sys, tomllib
from pathlib import Path
import nbformat, pytest
from aliprod.core import project_root, load_params_file
from aliprod.pipeline import main, run_pipeline, stage_notebooks, StageFailed

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
