"""End-to-end tests of the train stage: exact resume after a kill, manifest skipping, weight-file errors, top-k vs dense,
k-fold held-out predictions, 2-process gloo DDP against a single process, the init/rows/callbacks hooks, and the notebook under papermill."""
import hashlib, json, os, shutil, subprocess, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch

from aliprod.core import project_root
from aliprod.config import ExperimentParams
from aliprod.data import DataParams, prepare_data, load_index, dataset_info, data_artifacts
from aliprod.models import create_model, data_config
from aliprod.predictions import read_topk
import aliprod.train as T
from aliprod.train import TrainParams, run_train, train_job, run_job, KillAfterEpoch, SimulatedKill, predict, fold_of
from aliprod.config import ParamsError
from aliprod.finegrained import FinegrainedParams, callback_spec

# a small, fast dataset and config: 6 classes, 32 px images, 2 epochs + 1 finetune epoch
DATA = DataParams(n_classes=6, family_size=3, max_per_class=24, min_per_class=6, val_per_class=3, test_per_class=3,
                  img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
FAST = dict(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=40, finetune_epochs=1, epochs=2, bs=16, lr=0.05, warmup_epochs=1, milestones=[2],
            eval_splits=['val'])


@pytest.fixture(scope='module')
def exp(tmp_path_factory):
    d = tmp_path_factory.mktemp('train')
    e = ExperimentParams(experiment='t', seed=3, runs_dir=str(d/'runs'), reports_dir=str(d/'reports'))
    prepare_data(e, DATA)
    return e


def _weights(path): return torch.load(path, map_location='cpu', weights_only=True)


def _sha256(d:Path, files)->dict: return {f: hashlib.sha256((d/f).read_bytes()).hexdigest() for f in files}


def test_identical_and_resumed_runs_write_identical_bytes(exp, capsys):
    # augmentation, mixup and label smoothing on: resuming must restore every source of randomness
    p = TrainParams(**FAST, mixup=0.2, label_smoothing=0.1, hue_saturation=0.5, blur=0.3, coarse_dropout=0.3, tag='bytes')
    first = run_train(exp, DATA, p)
    m1 = json.loads((first.out_dir/'manifest.json').read_text())
    assert {'model.pth', 'checkpoint.pth', 'history.csv', 'metrics.json'} <= set(m1['outputs'])
    sha, h1 = _sha256(first.out_dir, m1['outputs']), pd.read_csv(first.history_path)
    shutil.rmtree(first.out_dir)
    second = run_train(exp, DATA, p)                                          # the same run again
    assert _sha256(second.out_dir, m1['outputs']) == sha, 'two identical runs wrote different bytes'
    shutil.rmtree(second.out_dir)
    job, run = train_job(exp, DATA, p)
    with pytest.raises(SimulatedKill): run_job(job, cbs=[KillAfterEpoch(2)])  # dies after the last low-res epoch
    ck = _weights(job.out_dir/'checkpoint.pth')
    assert ck['epoch'] == 2 and len(ck['history']) == 2 and not (job.out_dir/'model.pth').exists()
    capsys.readouterr()
    resumed = run_train(exp, DATA, p)
    assert 'resuming' in capsys.readouterr().out
    m3 = json.loads((resumed.out_dir/'manifest.json').read_text())
    differ = sorted(f for f in m1['outputs'] if m3['outputs'].get(f) != m1['outputs'][f])
    assert not differ, f"the resumed run's manifest fingerprints differ for {differ}"
    assert _sha256(resumed.out_dir, m1['outputs']) == sha, 'the resumed run wrote different bytes than the uninterrupted one'
    h2 = pd.read_csv(resumed.history_path)
    assert len(h2) == 3 and list(h2['phase']) == ['main', 'main', 'finetune'] and list(h2['img_size']) == [32, 32, 40]
    pd.testing.assert_frame_equal(h1, h2)


def test_manifest_skips_up_to_date_and_reruns_changed(exp):
    p = TrainParams(**FAST, tag='manifest')
    first = run_train(exp, DATA, p)
    stamp = {f: (first.out_dir/f).stat().st_mtime_ns for f in ('model.pth', 'checkpoint.pth', 'manifest.json')}
    again = run_train(exp, DATA, p)
    assert again.metrics == first.metrics
    assert {f: (first.out_dir/f).stat().st_mtime_ns for f in stamp} == stamp, 'an up-to-date run must not train again'
    assert not train_job(exp, DATA, replace(p, lr=0.02))[1].up_to_date()        # a changed parameter
    assert 'parameters changed: train' in train_job(exp, DATA, replace(p, lr=0.02))[1].why_stale()
    idx = data_artifacts(exp).index
    saved = idx.read_bytes()
    try:
        df = pd.read_parquet(idx); df.iloc[:-1].to_parquet(idx, index=False)      # a changed input index
        assert not train_job(exp, DATA, p)[1].up_to_date()
        assert train_job(exp, DATA, p)[1].why_stale() == 'inputs changed'
    finally: idx.write_bytes(saved)
    assert train_job(exp, DATA, p)[1].up_to_date()
    (first.out_dir/'predictions'/'val.parquet').unlink()                          # a missing output
    assert not train_job(exp, DATA, p)[1].up_to_date()


def test_workers_do_not_change_results(exp):
    # every draw's augmentation has its own seed (seed, epoch, rank, position), restored around the load: the main process
    # (workers 0) and a DataLoader worker (workers 1) draw the same crops, flips, jitter and erasing, and mixup is unaffected
    p = TrainParams(**{**FAST, 'finetune_epochs': 0, 'milestones': []}, mixup=0.2, hue_saturation=0.5, blur=0.3, coarse_dropout=0.3, tag='w0')
    w0 = run_train(exp, DATA, p)
    w1 = run_train(exp, DATA, replace(p, workers=1, tag='w1'))
    a, b = _weights(w0.model_path), _weights(w1.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a), 'workers 0 and 1 trained different weights'
    t0, t1 = read_topk(w0.predictions['val']), read_topk(w1.predictions['val'])
    np.testing.assert_array_equal(t0.rows, t1.rows); np.testing.assert_array_equal(t0.topk_labels, t1.topk_labels)
    np.testing.assert_array_equal(t0.topk_probs, t1.topk_probs)
    assert train_job(exp, DATA, replace(p, workers=4))[1].up_to_date(), 'workers is not part of the key: the results do not depend on it'


def test_wrong_shape_weight_file_is_refused(exp, tmp_path):
    sd = create_model('efficientnet_lite0', 6).backbone.state_dict()
    k = next(k for k, v in sd.items() if v.ndim == 4)
    sd[k] = torch.zeros(*sd[k].shape[:-1], sd[k].shape[-1] + 2)
    torch.save(sd, tmp_path/'bad.pth')
    with pytest.raises(ValueError, match='shape'):
        run_train(exp, DATA, TrainParams(**FAST, pretrained=True, weights=str(tmp_path/'bad.pth'), tag='badweights'))
    with pytest.raises(FileNotFoundError, match='not found'):
        run_train(exp, DATA, TrainParams(**FAST, pretrained=True, weights=str(tmp_path/'missing.pth'), tag='badweights'))


def test_topk_predictions_agree_with_dense_probabilities(exp, tmp_path):
    net = create_model('efficientnet_lite0', 6, embed_dim=16, bnneck=True).eval()
    idx = load_index(exp)
    root = dataset_info(exp)['root']
    out = predict(net, idx, 'test', tmp_path/'test.parquet', root, 32, k=3, bs=5, feats=True)
    t = read_topk(out, feats=True)
    test = idx[idx['split'] == 'test']
    np.testing.assert_array_equal(t.rows, test['row'].to_numpy())
    cfg = data_config(net)
    ds = T.ImageIndexDataset(test, root, transform=T.eval_transform(32, cfg['mean'], cfg['std']))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad(): f = net.forward_head(net.forward_features(x), pre_logits=True); logits = net.classifier(f)
    dense = logits.softmax(1).numpy()
    np.testing.assert_array_equal(t.topk_labels, np.argsort(-dense, 1, kind='stable')[:, :3])
    np.testing.assert_allclose(t.topk_probs, -np.sort(-dense, 1)[:, :3], atol=1e-5)
    np.testing.assert_allclose(t.p_label, dense[np.arange(len(test)), test['label'].to_numpy()], atol=1e-5)
    np.testing.assert_allclose(t.feats, f.numpy(), atol=1e-5)


def test_an_image_that_breaks_before_prediction_gets_no_prediction(exp, tmp_path):
    import shutil
    net = create_model('resnet18', 6, pretrained=False).eval()
    val = load_index(exp).query("split == 'val'").head(9)
    src, root = Path(dataset_info(exp)['root']), tmp_path/'root'
    for p in val['path']: (root/p).parent.mkdir(parents=True, exist_ok=True); shutil.copy(src/p, root/p)
    (root/val['path'].iloc[4]).write_bytes(b'not an image any more')  # broke after the data stage's scan
    failed = []
    t = read_topk(predict(net, val, 'val', tmp_path/'val.parquet', root, 32, k=3, bs=4, failed=failed))
    keep = val.drop(val.index[4])
    np.testing.assert_array_equal(t.rows, keep['row'].to_numpy())   # the broken row has no prediction, no other row is doubled
    assert [f[0] for f in failed] == [int(val['row'].iloc[4])]
    cfg = data_config(net)
    ds = T.ImageIndexDataset(keep, root, transform=T.eval_transform(32, cfg['mean'], cfg['std']))
    with torch.no_grad(): dense = net(torch.stack([ds[i][0] for i in range(len(ds))])).softmax(1).numpy()
    np.testing.assert_allclose(t.p_label, dense[np.arange(len(keep)), keep['label'].to_numpy()], atol=1e-5)  # each row: its own image


def test_kfold_trains_without_the_fold_and_predicts_it(exp):
    p = TrainParams(**{**FAST, 'finetune_epochs': 0, 'epochs': 2, 'milestones': []}, save_seen=True, tag='kfold')
    art = run_train(exp, DATA, p, fold=1, folds=2)
    assert art.out_dir.name == 'fold1' and set(art.predictions) == {'train'}
    train = load_index(exp).query("split == 'train'")
    held = train['row'].to_numpy()[fold_of(train['row'].to_numpy(), 2, exp.seed) == 1]
    t = read_topk(art.predictions['train'])
    np.testing.assert_array_equal(np.sort(t.rows), np.sort(held))
    seen = pd.read_parquet(art.out_dir/'seen_rows'/'rank0.parquet')
    assert not set(seen['row']) & set(held), 'the model of fold j must not see fold j'
    assert set(T.read_trained_rows(art.out_dir)['row']) == set(train['row']) - set(held), 'the rows its prior counts: all but fold j'
    with pytest.raises(ValueError, match='fold'): run_train(exp, DATA, p, fold=2, folds=2)


def test_ddp_two_gloo_processes_match_one_process(exp):
    # LayerNorm model, no augmentation or dropout: every global batch holds the same images in both runs and DDP
    # averages the two half-batch gradients, i.e. the full-batch mean, so weights differ only by float summation order
    cfg = dict(arch='test_efficientnet_ln', pretrained=False, img_size=32, finetune_size=None, finetune_epochs=0, epochs=3,
               bs=16, lr=0.05, optimizer='sgd', wd=5e-4, warmup_epochs=1, milestones=[], random_resized_crop=False, hflip=0., brightness_contrast=0.,
               eval_splits=['val'], save_seen=True)
    single = run_train(exp, DATA, TrainParams(**cfg, tag='single'))
    ddp = run_train(exp, DATA, TrainParams(**cfg, gpus=2, tag='ddp'))
    a, b = _weights(single.model_path), _weights(ddp.model_path)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    # 3 epochs × 4 steps of SGD from identical weights: float32 reordering noise (~1e-7 relative per step) stays far below 1e-4
    assert diff < 1e-4 * scale, f'2-process weights differ from 1-process by {diff} (max |w| {scale})'
    s0, s1 = (pd.read_parquet(ddp.out_dir/'seen_rows'/f'rank{r}.parquet') for r in (0, 1))
    one = pd.read_parquet(single.out_dir/'seen_rows'/'rank0.parquet')
    for e in one['epoch'].unique():
        r0, r1 = s0.loc[s0.epoch == e, 'row'], s1.loc[s1.epoch == e, 'row']
        assert len(r0) == len(r1) > 0
        assert not set(r0) & set(r1), f'ranks drew overlapping rows in epoch {e}'
        assert sorted([*r0, *r1]) == sorted(one.loc[one.epoch == e, 'row']), 'the two shards are not the single run\'s draw'
    np.testing.assert_allclose(ddp.metrics['val']['top1_err'], single.metrics['val']['top1_err'], atol=1 / 18 + 1e-9)


def _params_only(sd): return {k: v for k, v in sd.items() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))}


def test_init_starts_from_the_model_and_rows_restrict_training(exp, tmp_path):
    base = run_train(exp, DATA, TrainParams(**FAST, tag='base'))
    train = load_index(exp).query("split == 'train'")
    sub = train.loc[train['label'] < 2, 'row'].to_numpy()
    rows = tmp_path/'rows.parquet'; pd.DataFrame({'row': sub}).to_parquet(rows)
    # an lr of 1e-9 leaves the weights where they start: those of `init`, not the package's ImageNet weights
    ft = TrainParams(**{**FAST, 'finetune_epochs': 0, 'epochs': 1, 'warmup_epochs': 0, 'milestones': [], 'lr': 1e-9, 'wd': 0., 'bs': 8}, save_seen=True, tag='ft')
    art = run_train(exp, DATA, ft, init=base.model_path, rows=rows)
    a, b = _params_only(_weights(base.model_path)), _params_only(_weights(art.model_path))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    fresh = _params_only(_weights(run_train(exp, DATA, replace(ft, tag='ft-noinit'), rows=rows).model_path))
    assert (fresh['classifier.weight'] - a['classifier.weight']).abs().max() > 1e-3, 'without init the run starts elsewhere'
    seen = pd.read_parquet(art.out_dir/'seen_rows'/'rank0.parquet')
    assert set(seen['row']) <= set(sub) and art.metrics['train_images'] == len(sub)
    assert set(T.read_trained_rows(art.trained_rows)['row']) == set(sub)   # what every prior of this model counts
    # the subset's content is an input of the manifest: the same rows skip, other rows rerun
    assert train_job(exp, DATA, ft, init=base.model_path, rows=rows)[1].up_to_date()
    pd.DataFrame({'row': sub[:-1]}).to_parquet(rows)
    assert not train_job(exp, DATA, ft, init=base.model_path, rows=rows)[1].up_to_date()


def test_hooks_refuse_bad_input(exp, tmp_path):
    val_row = int(load_index(exp).query("split == 'val'")['row'].iloc[0])
    rows = tmp_path/'rows.parquet'; pd.DataFrame({'row': [val_row]}).to_parquet(rows)
    p = TrainParams(**{**FAST, 'finetune_epochs': 0, 'epochs': 1, 'warmup_epochs': 0, 'milestones': [], 'bs': 8}, tag='bad-rows')
    with pytest.raises(ParamsError, match='not labelled train rows'): run_train(exp, DATA, p, rows=rows)
    other = tmp_path/'resnet.pth'; torch.save(create_model('resnet18', 6, pretrained=False).state_dict(), other)
    with pytest.raises(ParamsError, match='resnet.pth does not fit'): run_train(exp, DATA, replace(p, tag='bad-init'), init=other)
    with pytest.raises(FileNotFoundError, match='init file'): run_train(exp, DATA, p, init=tmp_path/'missing.pth')
    with pytest.raises(ValueError, match='must be a function of an aliprod module'): T.build_callbacks([{'factory': 'os.system', 'kwargs': {}}])


def test_resume_with_training_only_heads_equals_straight_run(exp):
    # DCL's heads live in the run's optimiser and checkpoint: a run killed mid-way resumes them exactly
    spec = callback_spec('dcl', FinegrainedParams(dcl_patches=2))
    p = TrainParams(**FAST, tag='dcl-straight')
    straight = run_train(exp, DATA, p, callbacks=spec)
    killed = replace(p, tag='dcl-killed')
    job, _ = train_job(exp, DATA, killed, callbacks=spec)
    with pytest.raises(SimulatedKill): run_job(job, cbs=[KillAfterEpoch(2)])
    assert any(k.startswith('heads.') for k in _weights(job.out_dir/'checkpoint.pth')['model'])
    resumed = run_train(exp, DATA, killed, callbacks=spec)
    a, b = _weights(straight.model_path), _weights(resumed.model_path)
    assert a.keys() == b.keys() and not any(k.startswith('heads.') for k in a), 'model.pth is the plain ProductNet'
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0
    h1, h2 = pd.read_csv(straight.history_path), pd.read_csv(resumed.history_path)
    assert {'dcl_adversarial', 'dcl_alignment'} <= set(h1.columns)
    pd.testing.assert_frame_equal(h1, h2)
    plain = _weights(run_train(exp, DATA, replace(p, tag='dcl-plain')).model_path)
    assert max((a[k].float() - plain[k].float()).abs().max().item() for k in a) > 0, 'the callback changed nothing'


def test_ddp_workers_rebuild_callbacks_from_specs(exp):
    spec = callback_spec('dcl', FinegrainedParams(dcl_patches=2))
    cfg = dict(arch='test_efficientnet_ln', pretrained=False, img_size=32, finetune_size=None, finetune_epochs=0, epochs=1,
               bs=16, lr=0.05, optimizer='sgd', wd=5e-4, warmup_epochs=0, milestones=[], eval_splits=['val'])
    ddp = run_train(exp, DATA, TrainParams(**cfg, gpus=2, tag='ddp-dcl'), callbacks=spec)
    h = pd.read_csv(ddp.history_path)
    assert h['dcl_adversarial'].notna().all() and h['dcl_alignment'].notna().all()
    assert any(k.startswith('heads.') for k in _weights(ddp.out_dir/'checkpoint.pth')['model'])
    assert json.loads((ddp.out_dir/'job.json').read_text())['callbacks'] == spec


def test_papermill_runs_the_notebook(tmp_path):
    env = {**os.environ, 'ALIPROD_ROOT': str(project_root())}
    r = subprocess.run([sys.executable, '-m', 'papermill', str(project_root()/'nbs'/'02_train.ipynb'), str(tmp_path/'out.ipynb'),
                        '-p', 'experiment', 'pm', '-p', 'runs_dir', str(tmp_path/'runs'), '-p', 'reports_dir', str(tmp_path/'reports'),
                        '--log-output', '--cwd', str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path/'runs'/'pm'/'train'/'0'
    # what the stage wrote, read back: predictions of every image of each split, metrics computed from them, 3 epochs
    from aliprod.predictions import read_topk
    from aliprod.metrics import evaluate
    idx = pd.read_parquet(tmp_path/'runs'/'pm'/'data'/'index.parquet')
    for s in ('train', 'val', 'test'):
        assert sorted(read_topk(d/'predictions'/f'{s}.parquet').rows) == sorted(idx.loc[idx.split == s, 'row']), s
    m = json.loads((d/'metrics.json').read_text())
    assert m['test']['mean_class_err'] == evaluate(read_topk(d/'predictions'/'test.parquet'))['mean_class_err']
    assert len(pd.read_csv(d/'history.csv')) == 3 and json.loads((d/'manifest.json').read_text())['stage'] == 'train'
    assert 'epoch 3/3' in r.stdout + r.stderr, 'log lines must reach papermill --log-output'
    assert (tmp_path/'reports'/'pm'/'train_0.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_shot_groups_come_from_the_data_section(tmp_path):
    # data: {many_threshold: 20, few_threshold: 6}: the train stage's metrics use the data stage's thresholds (aliprod.data.shot_groups),
    # as the rebalance stage does, so the report's rows compare the same classes
    from aliprod.data import shot_groups
    from aliprod.metrics import evaluate
    e = ExperimentParams(experiment='shots', seed=1, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = replace(DATA, many_threshold=20, few_threshold=6)
    prepare_data(e, data)
    art = run_train(e, data, TrainParams(**{**FAST, 'finetune_epochs': 0, 'epochs': 2, 'milestones': []}))
    g = shot_groups(e)
    assert (g['many'], g['few']) == (20, 6) and (g['train_counts'] > 20).any()
    assert 'many_acc' in art.metrics['val']
    t = read_topk(art.predictions['val'])
    from aliprod.rundirs import json_safe
    ref = json_safe(evaluate(t, topk=(1, 5), **g))  # metrics.json writes NaN (an empty group) as null
    assert {k: ref[k] for k in ('many_acc', 'medium_acc', 'few_acc') if k in ref} == {k: art.metrics['val'][k] for k in ('many_acc', 'medium_acc', 'few_acc') if k in ref}
