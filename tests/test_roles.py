"""The choosing/reporting roles are a property of the data: on AliProducts JSON without a test split, flipping the labels
of val's reporting half changes no choice of any stage (kept round, τ-norm τ, logit-adjustment τ, the system's method, τ,
TTA variant and ensemble members, and the numbers each was chosen on); only the reported numbers move."""
import html, json, shutil, subprocess, sys
from pathlib import Path
import numpy as np, pandas as pd, pytest, yaml
from aliprod.metrics import choosing_half
from test_real_recipe import make_aliproducts

ALIPROD = str(Path(sys.executable).parent/'aliprod')
EXP = 'roles'


def _params(tmp:Path, data:Path)->Path:
    "Smoke sizes; every stage that chooses something (clean, rebalance, system) and the report, on the val split"
    cfg = {'experiment': EXP, 'seed': 0, 'device': 'cpu', 'runs_dir': str(tmp/'runs'), 'reports_dir': str(tmp/'reports'),
           'data': {'source': 'aliproducts', 'root': str(data), 'train_file': 'train.json', 'val_file': 'val.json',
                    'scan_workers': 1, 'many_threshold': 12, 'few_threshold': 6},
           'train': {'arch': 'test_efficientnet', 'pretrained': False, 'img_size': 32, 'finetune_size': None, 'finetune_epochs': 0,
                     'epochs': 2, 'warmup_epochs': 0, 'milestones': [2], 'bs': 16, 'workers': 0, 'embed_dim': 16, 'amp': False},
           'clean': {'iteration': 1, 'select': 'validation', 'allow_aggressive': True},
           'rebalance': {'iteration': 'kept', 'methods': ['crt', 'tau_norm', 'logit_adjust', 'ncm'], 'crt_epochs': 1, 'batch_size': 16,
                         'tau_grid': [0.0, 0.3, 0.6, 1.0, 1.5], 'la_tau_grid': [0.0, 0.5, 1.0, 1.5, 2.0]},
           'tta': {'iteration': 'kept', 'views': 'five', 'enlarge': 1.25, 'compare': ['center@1'], 'bs': 16, 'workers': 0},
           'system': {'max_members': 3, 'bootstrap': 200, 'target': 'given', 'bs': 16},
           'report': {'split': 'val', 'target': 'given', 'hires_tag': None, 'bootstrap': 200},
           'pipeline': {'stages': ['train', 'clean', 'rebalance', 'tta', 'system', 'report']}}
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp/'params.yaml'
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _start(tmp:Path, data:Path, *cmd)->subprocess.Popen:
    "`aliprod <cmd> params` on `data`, in the background; its output in tmp/out.txt"
    p = _params(tmp, data)
    with open(tmp/'out.txt', 'w') as out:
        return subprocess.Popen([ALIPROD, *cmd[:1], str(p), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT, cwd=tmp)


def _wait(proc:subprocess.Popen, tmp:Path)->Path:
    "Wait for `proc`; runs/<experiment>/"
    assert proc.wait(timeout=900) == 0, f'exit {proc.returncode}\n{(tmp/"out.txt").read_text()[-6000:]}'
    return tmp/'runs'/EXP


def _swap_reporting_labels(val:pd.DataFrame, seed:int)->np.ndarray:
    "Val labels with reporting images' labels swapped pairwise across classes, wherever the swap leaves every role as it was"
    rows, labels, choose = val['row'].to_numpy(), val['label'].to_numpy().copy(), (val['role'] == 'choose').to_numpy()
    rep, done = np.flatnonzero(~choose), np.zeros(len(val), bool)
    for i in rep:
        for j in rep:
            if done[i] or done[j] or labels[i] == labels[j]: continue
            trial = labels.copy(); trial[[i, j]] = labels[[j, i]]
            # the roles are stratified by class: keep a swap only if the data stage would give every image the same role
            if (choosing_half(rows, trial, seed) == choose).all(): labels, done[i], done[j] = trial, True, True
    return labels


def _flipped_copy(data:Path, runs:Path, out:Path)->tuple[Path, int]:
    "A copy of the dataset whose reporting val images carry another class (the file moved to that class's folder too)"
    idx = pd.read_parquet(runs/'data'/'index.parquet')
    names = pd.read_parquet(runs/'data'/'classes.parquet').set_index('label')['class_name']
    val = idx[idx['split'] == 'val'].reset_index(drop=True)
    new = _swap_reporting_labels(val, 0)
    moved = {Path(p).name: names[y] for p, y, old in zip(val['path'], new, val['label']) if y != old}
    assert len(moved) >= (val['role'] == 'report').sum() // 2, 'most reporting labels flipped'
    assert not set(val.loc[val['role'] == 'choose', 'path'].map(lambda p: Path(p).name)) & set(moved), 'no choosing label touched'
    shutil.copytree(data, out)
    recs = json.loads((out/'val.json').read_text())['images']
    for r in recs:
        if r['image_id'] in moved:
            (out/'val'/moved[r['image_id']]).mkdir(parents=True, exist_ok=True)
            shutil.move(out/'val'/r['class_id']/r['image_id'], out/'val'/moved[r['image_id']]/r['image_id'])
            r['class_id'] = moved[r['image_id']]
    (out/'val.json').write_text(json.dumps({'images': recs}))
    return out, len(moved)


def _choices(runs:Path)->dict:
    "Every choice of the run and the numbers it was made on"
    sel = json.loads((runs/'clean'/'selection.json').read_text())
    kept = sel['kept_iteration']
    reb = runs/'rebalance'/str(kept)
    system = json.loads((runs/'system'/'system.json').read_text())
    cands = pd.read_csv(runs/'system'/'system_candidates.csv')
    return {'kept round': kept, 'round decisions': sel['decisions'],
            'round guard error': json.loads((runs/'clean'/'1'/'summary.json').read_text())['model_error'],   # the guard's val error
            'tau_norm τ': json.loads((reb/'tau_norm'/'metrics.json').read_text())['tau'],
            'logit_adjust τ': json.loads((reb/'logit_adjust'/'metrics.json').read_text())['tau'],
            'τ sweep': pd.read_csv(reb/'tau_sweep.csv').to_dict('list'),
            'system choices': system['choices'], 'system candidates': cands.filter(regex='^(step|candidate|choose_|chosen)').to_json()}   # json: NaN == NaN


@pytest.mark.timeout(900)
def test_flipping_the_reporting_labels_changes_no_choice(tmp_path):
    data = make_aliproducts(tmp_path/'data', counts=[20, 14, 10, 8, 6, 5], val_per_class=4)
    a = _wait(_start(tmp_path/'a', data, 'data'), tmp_path/'a')   # the roles first: which labels to flip
    flipped, n = _flipped_copy(data, a, tmp_path/'flipped')
    # both runs at once (`--in-process`: no notebook kernels); each alone is deterministic, whatever runs beside it
    runs = [_start(tmp_path/w, d, 'run', '--in-process') for w, d in (('a', data), ('b', flipped))]
    a, b = (_wait(r, tmp_path/w) for r, w in zip(runs, 'ab'))
    ia, ib = (pd.read_parquet(r/'data'/'index.parquet') for r in (a, b))
    assert ia['row'].tolist() == ib['row'].tolist() and ia['role'].tolist() == ib['role'].tolist()   # the same roles, row by row
    assert (ia['label'] != ib['label']).sum() == n and set(ia.loc[ia['label'] != ib['label'], 'role']) == {'report'}
    ca, cb = _choices(a), _choices(b)
    for what in ca: assert ca[what] == cb[what], f'{what} changed when only reporting labels did: {ca[what]} -> {cb[what]}'
    # the reported numbers moved: the system's, on the reporting half, and every techniques-alone row's
    sa, sb = (json.loads((r/'system'/'system.json').read_text())['numbers'] for r in (a, b))
    assert sa['mean_class_err'] != sb['mean_class_err'] and sa['report_images'] == sb['report_images']
    ta, tb = (pd.read_csv(t/'reports'/EXP/'techniques_alone.csv') for t in (tmp_path/'a', tmp_path/'b'))
    assert len(ta) and ta['technique'].tolist() == tb['technique'].tolist()
    assert (ta['images'] == sa['report_images']).all(), 'techniques alone are on the reporting images only'
    assert (ta['mean_class_err'] != tb['mean_class_err']).any()
    page = html.unescape((tmp_path/'a'/'reports'/EXP/'index.html').read_text())
    assert 'choosing images of val' in page and "role 'report'" in page
