"Decoupled classifier learning (aliprod.rebalance): the properties the ablation table relies on"
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from aliprod.config import ParamsError
from aliprod.decoupled import (Features, synthetic_features, linear_from, head_logits, head_top1, tau_normalize,
                               tau_normalized_head, sweep_tau, choose_tau, fit_head, crt_head, LearnableWeightScaling,
                               class_means, balanced_subset, _linear_parts)
from aliprod.losses import accuracy_loss
from aliprod.rebalance import RebalanceParams, rebalance_features, fit_options
from aliprod.samplers import class_counts

COUNTS = np.array([400, 300, 200, 150, 100, 60, 30, 15, 8, 4, 3, 3])
K = len(COUNTS)


@pytest.fixture(scope='module')
def long_tail():
    "Overlapping clusters with a long tail and a classifier trained instance-balanced (the baseline)"
    splits = {'train': synthetic_features(COUNTS, dim=8, noise=1.4, seed=11),
              'val': synthetic_features(np.full(K, 30), dim=8, noise=1.4, seed=12, start_row=10_000),
              'test': synthetic_features(np.full(K, 30), dim=8, noise=1.4, seed=13, start_row=20_000)}
    trained = crt_head(8, K, seed=3)
    fit_head(trained, splits['train'], K, epochs=30, lr=0.2, mode='instance', batch_size=64)
    return splits, trained


@pytest.mark.parametrize('bias', [True, False])
def test_tau_zero_reproduces_the_classifier(bias):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(9, 6, generator=g) * 3, torch.randn(50, 6, generator=g)
    b = torch.randn(9, generator=g) if bias else None
    head = tau_normalized_head(w, b, 0.0, 'keep' if bias else 'none')
    assert torch.equal(head_logits(head, x), head_logits(linear_from(w, b), x))
    assert torch.equal(tau_normalize(w, 0), w)
    assert torch.allclose(tau_normalize(w, 1).norm(dim=1), torch.ones(9), atol=1e-6)


def test_tau_bias_none_refuses_a_bias():
    with pytest.raises(ValueError, match="tau_bias='none' but the classifier has a bias"):
        tau_normalized_head(torch.ones(3, 2), torch.zeros(3), 1.0, 'none')


def test_class_balanced_training_sees_classes_uniformly():
    "A spy head fed one-hot class features records the classes of every batch fit_head trains on"
    counts = np.array([500, 100, 20, 5, 1])
    y = np.repeat(np.arange(5), counts)
    data = Features(np.arange(len(y)), y, np.eye(5, dtype=np.float32)[y])
    seen = []
    class Spy(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(5, 5)
        def forward(self, x): seen.append(x.argmax(1)); return self.lin(x)
    fit_head(Spy(), data, 5, epochs=4, samples_per_epoch=5000, batch_size=250, seed=3)
    n = np.bincount(torch.cat(seen).numpy(), minlength=5)
    assert n.sum() == 20_000
    chi2 = ((n - n.sum() / 5)**2 / (n.sum() / 5)).sum()
    assert chi2 < 18.47, (n, chi2)  # 4 degrees of freedom, 99.9%


def test_tau_is_chosen_on_validation_not_test(long_tail):
    splits, trained = long_tail
    p = RebalanceParams(methods=['tau_norm'])
    clean = rebalance_features(trained, splits, K, p)
    # poison: the test split becomes head-class images with a shuffled copy of their features
    head_imgs = splits['train'].take(np.flatnonzero(splits['train'].labels == 0))
    for poison in (head_imgs, Features(splits['test'].rows, splits['test'].labels, -100 * splits['test'].feats)):
        res = rebalance_features(trained, {**splits, 'test': poison}, K, p)
        assert res['tau_norm'].info['tau'] == clean['tau_norm'].info['tau']
        assert res['tau_norm'].info['sweep'].equals(clean['tau_norm'].info['sweep'])
    # ... while a τ chosen on the poisoned split would have moved
    on_test = choose_tau(sweep_tau(*_linear_parts(trained), head_imgs, {'train_counts': class_counts(splits['train'].labels, K)}, p.tau_grid))
    assert on_test != clean['tau_norm'].info['tau']


def test_lws_keeps_the_classifier_frozen(long_tail):
    splits, trained = long_tail
    lws = LearnableWeightScaling(trained)
    w, b = trained.weight.detach().clone(), trained.bias.detach().clone()
    fit_head(lws, splits['train'], K, epochs=3, lr=0.2, samples_per_epoch=1000)
    assert torch.equal(lws.classifier.weight, w) and torch.equal(lws.classifier.bias, b)
    assert torch.equal(trained.weight, w)                                  # the original is untouched too
    assert not torch.equal(lws.scales.detach(), torch.ones(K))             # the scales did learn
    x = torch.as_tensor(splits['val'].feats[:5])
    assert torch.allclose(lws(x), trained(x) * lws.scales, atol=1e-6)


def test_ncm_centroids_hand_computed():
    toy = Features(np.arange(3), np.array([0, 0, 1]), np.array([[2., 0], [0, 0], [1, 3]], np.float32))
    ncm = class_means(toy, 3)  # cl2n: mean (1,1); centred, L2-normalised: (1,-1)/√2, (-1,-1)/√2, (0,1)
    assert torch.allclose(ncm.mean, torch.tensor([1., 1.]))
    assert torch.allclose(ncm.centroids[:2], torch.tensor([[0., -2**-0.5], [0., 1.]]), atol=1e-6)
    assert ncm.present.tolist() == [True, True, False]
    logits = ncm(torch.tensor([[1., 3.]]))
    assert torch.allclose(logits[0, :2], torch.tensor([-(1.5 + 2**0.5), 0.]), atol=1e-5)
    assert logits[0, 2] == float('-inf')
    assert torch.allclose(class_means(toy, 2, 'un').centroids, torch.tensor([[1., 0.], [1., 3.]]))
    assert torch.allclose(class_means(toy, 2, 'l2n').centroids, torch.tensor([[0.5, 0.], [10**-0.5, 3 * 10**-0.5]]), atol=1e-6)


def test_accuracy_loss_identities():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(8, 6, generator=g), torch.randint(0, 6, (8,), generator=g)
    p_true = logits.softmax(1)[torch.arange(8), y]
    assert torch.allclose(accuracy_loss(logits, y), 1 - p_true.mean(), atol=1e-6)                    # summed per row
    assert torch.allclose(accuracy_loss(logits, F.one_hot(y, 6).float()), 1 - p_true.mean(), atol=1e-6)
    for scale in (0.1, 1., 5.):  # element-wise: constant (while no probability underflows to 0)
        assert torch.allclose(accuracy_loss(logits * scale, y, 'element'), torch.tensor(1 - 1/6), atol=1e-6)
    l = logits.clone().requires_grad_(); accuracy_loss(l, y).backward()
    assert l.grad.abs().sum() > 0


def test_crt_on_separable_features_reaches_high_accuracy():
    tr = synthetic_features(np.array([300, 120, 40, 12, 5, 3]), dim=16, noise=0.3, seed=1)
    te = synthetic_features(np.full(6, 50), dim=16, noise=0.3, seed=2)
    head = crt_head(16, 6)
    fit_head(head, tr, 6, epochs=8, lr=0.5, samples_per_epoch=600, batch_size=64)
    assert (head_top1(head, te.feats) == te.labels).mean() > 0.97


def test_decoupled_methods_raise_few_shot_accuracy(long_tail):
    splits, trained = long_tail
    p = RebalanceParams(crt_epochs=10, lws_epochs=5, samples_per_epoch=1200)
    from aliprod.decoupled import head_topk
    from aliprod.rebalance import results_table
    res = rebalance_features(trained, splits, K, p, train_p_label=head_topk(trained, splits['train']).p_label)
    few = results_table(res).query("split == 'test'").set_index('method')['few_acc']
    for m in ('crt', 'tau_norm', 'lws', 'logit_adjust', 'balanced_softmax'): assert few[m] > few['baseline'], (m, few.to_dict())


def test_balanced_subset_and_params():
    y = np.array([0, 0, 0, 1, 1, 2, 0]); p = np.array([.9, .1, .5, .3, .8, .2, .7])
    assert balanced_subset(y, p, 2).tolist() == [0, 3, 4, 5, 6]
    with pytest.raises(ParamsError, match="Unknown method 'tau'"): RebalanceParams(methods=['tau'])
    with pytest.raises(ParamsError, match='twice'): RebalanceParams(methods=['crt', 'crt'])


def test_network_finetunes_run_through_the_train_stage(tmp_path):
    import json, pandas as pd
    from aliprod.predictions import read_topk
    import aliprod.train as T
    from aliprod.config import ExperimentParams
    from aliprod.data import DataParams
    from aliprod.rebalance import run_rebalance
    exp = ExperimentParams(experiment='rb', seed=1, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = DataParams(n_classes=6, family_size=3, max_per_class=40, min_per_class=6, val_per_class=3, test_per_class=3,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
    t = T.TrainParams(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=None, finetune_epochs=0, epochs=2, bs=16, lr=0.05,
                      warmup_epochs=1, milestones=[2], eval_splits=['train', 'val', 'test'])
    p = RebalanceParams(methods=['crt', 'balanced_subset', 'two_stage', 'acc_loss'], finetune='both', subset_per_class=5, crt_epochs=2,
                        head_cap=10, samples_per_epoch=48, network_lr=0.01)
    from aliprod.data import prepare_data
    prepare_data(exp, data); T.train_round(exp, data, t)   # the stages rebalance needs (`call_stage` runs them first)
    art = run_rebalance(exp, data, t, p)
    nets = ['balanced_subset-network', 'two_stage-network', 'acc_loss-network']
    assert list(art.table[art.table.split == 'test'].method) == ['baseline', 'crt', 'balanced_subset', 'two_stage', 'acc_loss',
                                                                 'instance-network', *nets]
    # each whole-network finetune is measured against the control of the same length: instance sampling, every image
    tt = art.table[art.table.split == 'test'].set_index('method')
    assert (tt.loc[nets, 'compared_with'] == 'instance-network').all() and tt.loc['instance-network', 'compared_with'] == 'baseline'
    assert ((tt.loc[nets, 'mean_class_err'] - tt.loc['instance-network', 'mean_class_err']) == tt.loc[nets, 'mean_class_err_change']).all()
    n_train = int((T.load_index(exp)['split'] == 'train').sum())
    assert json.loads((art.out_dir/'instance-network'/'metrics.json').read_text())['images'] == n_train
    start = torch.load(art.out_dir.parent.parent/'train'/'0'/'model.pth', weights_only=True)
    w = {m: torch.load(art.out_dir/m/'train'/'model.pth', weights_only=True) for m in nets}
    for m in nets:  # the backbone moved: the whole network was finetuned, starting from the trained model
        moved = max((w[m][k].float() - start[k].float()).abs().max().item() for k in start if k.startswith('backbone.') and start[k].is_floating_point())
        assert moved > 0, m
        met = json.loads((art.out_dir/m/'metrics.json').read_text())
        assert {'val', 'test', 'images', 'model'} <= set(met)
        test_rows = T.load_index(exp).query("split == 'test'")['row']   # predictions of every test image, read back
        assert sorted(read_topk(art.out_dir/m/'predictions'/'test.parquet').rows) == sorted(test_rows), m
    rows = pd.read_parquet(art.out_dir/'balanced_subset-network'/'rows.parquet')['row']
    labels = T.load_index(exp).set_index('row').loc[rows, 'label']
    assert labels.value_counts().max() <= 5 and labels.nunique() == 6, 'at most subset_per_class per class, no class emptied'
    assert json.loads((art.out_dir/'balanced_subset-network'/'metrics.json').read_text())['images'] == len(rows)
    counts = T.load_index(exp).query("split == 'train'")['label'].value_counts()
    assert json.loads((art.out_dir/'two_stage-network'/'metrics.json').read_text())['images'] == int(counts.clip(upper=10).sum())
    # same subset and schedule, another loss: acc_loss trains differently, and its training loss is an accuracy (in [0, 1])
    assert max((w['acc_loss-network'][k].float() - w['balanced_subset-network'][k].float()).abs().max().item() for k in start) > 0
    assert pd.read_csv(art.out_dir/'acc_loss-network'/'train'/'history.csv')['train_loss'].between(0, 1).all()
    # another τ grid reruns the stage but not the finetunes: their train runs are up to date (manifests and weights untouched)
    stamps = {m: ((art.out_dir/m/'train'/'manifest.json').stat().st_mtime_ns, (art.out_dir/m/'train'/'model.pth').read_bytes()) for m in nets}
    again = run_rebalance(exp, data, t, RebalanceParams(**{**p.__dict__, 'tau_grid': [0.0, 1.0]}))
    assert {m: ((art.out_dir/m/'train'/'manifest.json').stat().st_mtime_ns, (art.out_dir/m/'train'/'model.pth').read_bytes()) for m in nets} == stamps
    pd.testing.assert_frame_equal(again.table.drop(columns='seconds'), art.table.drop(columns='seconds'))
    with pytest.raises(ParamsError, match='network_epochs'): RebalanceParams(network_epochs=0)


def test_stages_run_without_a_test_split(tmp_path):
    "AliProducts' test labels are not public: train refuses to predict a split with no rows before training, rebalance uses train and val"
    import json
    import aliprod.train as T
    from aliprod.predictions import read_topk
    from aliprod.config import ExperimentParams
    from aliprod.data import DataParams
    from aliprod.rebalance import run_rebalance
    exp = ExperimentParams(experiment='notest', seed=2, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = DataParams(n_classes=5, family_size=5, max_per_class=30, min_per_class=6, val_per_class=3, test_per_class=0,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1)
    t = T.TrainParams(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=None, finetune_epochs=0, epochs=1, bs=16, lr=0.05,
                      warmup_epochs=0, milestones=[1], head_cap=12)   # classes of 30 down to 6 images: the head is capped
    named = T.TrainParams(**{**t.__dict__, 'eval_splits': ['train', 'val', 'test']})   # naming a split the index lacks
    from aliprod.data import prepare_data
    prepare_data(exp, data)
    with pytest.raises(ParamsError, match="no 'test' rows"): T.run_train(exp, data, named)
    assert not (tmp_path/'runs'/'notest'/'train'/'0'/'checkpoint.pth').exists(), 'refused before training'
    t = T.TrainParams(**{**t.__dict__, 'eval_splits': ['train', 'val']})
    T.train_round(exp, data, t)
    art = run_rebalance(exp, data, t, RebalanceParams(methods=['crt', 'tau_norm', 'logit_adjust', 'balanced_softmax'], crt_epochs=1))
    assert set(art.table['split']) == {'val'} and set(art.table['method']) == {'baseline', 'crt', 'tau_norm', 'logit_adjust', 'balanced_softmax'}
    # the prior is the one the classifier learned: logit adjustment and the weight-norm figure count the rows it trained on
    import pandas as pd
    from aliprod.losses import log_prior
    trained = T.trained_counts(art.out_dir.parent.parent/'train'/'0', 5)
    split = np.bincount(T.load_index(exp).query("split == 'train'")['label'], minlength=5)
    assert trained.max() == 12 and (trained < split).any(), (trained, split)
    torch.testing.assert_close(torch.load(art.out_dir/'logit_adjust'/'head.pth', weights_only=True)['log_prior'], log_prior(trained))
    assert pd.read_parquet(art.out_dir/'weight_norms.parquet')['train_images'].tolist() == trained.tolist()
    # the new methods are laid out like the others (what the composed system reads), and the weight-norm figure and note are written
    val_rows = sorted(T.load_index(exp).query("split == 'val'")['row'])
    for m in ('logit_adjust', 'balanced_softmax'):   # read back: a head, predictions of every val image, their metrics
        assert (art.out_dir/m/'head.pth').stat().st_size > 0 and 'val' in json.loads((art.out_dir/m/'metrics.json').read_text())
        assert sorted(read_topk(art.out_dir/m/'predictions'/'val.parquet').rows) == val_rows, m
    assert (tmp_path/'reports'/'notest'/'weight_norms.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'Classifier row norms' in (art.out_dir/'rebalance.md').read_text()
    assert art.splits == ['val'] and (art.table.loc[art.table.method == 'baseline', 'mean_class_err_change'] == 0).all()
    metrics = json.loads((art.out_dir/'manifest.json').read_text())['metrics']
    assert 'crt_mean_class_err' in metrics and metrics['metrics_split'] == 'val'
    # the whole-network finetunes predict the splits that exist (they used to ask for val and test)
    nt = run_rebalance(exp, data, t, RebalanceParams(methods=['two_stage'], finetune='network', samples_per_epoch=32, head_cap=10))
    assert list(nt.table.method) == ['baseline', 'instance-network', 'two_stage-network'] and set(nt.table.split) == {'val'}
    assert not (nt.out_dir/'two_stage-network'/'train'/'predictions'/'test.parquet').exists()


def test_rebalance_refuses_before_work_what_the_splits_cannot_support(tmp_path):
    "No val split: tau_norm cannot choose τ, refused before training; the other methods are evaluated on test"
    import aliprod.train as T
    from aliprod.config import ExperimentParams
    from aliprod.data import DataParams
    from aliprod.rebalance import run_rebalance
    from aliprod.schema import labelled_splits
    import pandas as pd
    exp = ExperimentParams(experiment='noval', seed=2, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = DataParams(n_classes=5, family_size=5, max_per_class=30, min_per_class=6, val_per_class=0, test_per_class=3,
                      img_size=32, img_size_max=40, gen_workers=1, scan_workers=1, val_from_test=False)   # no val split at all
    t = T.TrainParams(optimizer='sgd', wd=5e-4, img_size=32, finetune_size=None, finetune_epochs=0, epochs=1, bs=16, lr=0.05,
                      warmup_epochs=0, milestones=[1], eval_splits=['train', 'test'])
    from aliprod.data import prepare_data
    prepare_data(exp, data)
    with pytest.raises(ParamsError, match='tau_norm chooses τ on the val split'): run_rebalance(exp, data, t, RebalanceParams(methods=['crt', 'tau_norm']))
    assert not (tmp_path/'runs'/'noval'/'train').exists(), 'refused before training'
    idx = pd.DataFrame({'split': ['train', 'train', 'val', 'test'], 'label': [0, 1, -1, 2]})
    assert labelled_splits(idx) == ['train', 'test'], 'a split whose rows have no label is not evaluated'


def test_crt_lr_follows_the_batch_size():
    "Kang et al.'s cRT: 0.2 at batch 512, scaled linearly (params/aliproducts.yaml runs batch 512: 0.2, not the batch-64 default 0.025)"
    import yaml
    from pathlib import Path
    assert RebalanceParams().crt_peak_lr == pytest.approx(0.025)
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1]/'params'/'aliproducts.yaml').read_text())['rebalance']
    assert RebalanceParams(**recipe).crt_peak_lr == pytest.approx(0.2)
    assert RebalanceParams(batch_size=256, crt_lr=0.3).crt_peak_lr == 0.3
    with pytest.raises(ParamsError, match='crt_lr'): RebalanceParams(crt_lr=-1.0)


def test_logit_adjustment_and_balanced_softmax_identities(long_tail):
    "τ = 0 is the plain classifier; Balanced Softmax on a balanced prior is cross-entropy; the prior is the training split's"
    from aliprod.losses import log_prior, logit_adjust, balanced_softmax_loss, LogitAdjustedHead
    from aliprod.decoupled import sweep_logit_adjust, fit_method, head_topk
    splits, trained = long_tail
    x = torch.from_numpy(splits['val'].feats)
    assert torch.equal(LogitAdjustedHead(trained, log_prior(COUNTS), 0.0)(x), trained(x))
    z = trained(x).detach()
    assert torch.equal(logit_adjust(z, log_prior(COUNTS), 1.0).argmax(1), (z - log_prior(COUNTS)).argmax(1))
    y = torch.from_numpy(splits['val'].labels)
    assert torch.allclose(balanced_softmax_loss(z, y, log_prior(np.full(K, 9))), F.cross_entropy(z, y))
    groups = {'train_counts': COUNTS}
    sw = sweep_logit_adjust(trained, log_prior(COUNTS), splits['val'], groups, grid=(0.0, 1.0))
    from aliprod.metrics import evaluate
    assert np.isclose(sw['all'].iloc[0], 1 - evaluate(head_topk(trained, splits['val']), **groups)['mean_class_err'])
    head, info = fit_method('logit_adjust', trained, splits['train'], splits['val'], K,
                            **fit_options(RebalanceParams(la_tau_grid=[0.0, 0.5, 1.0]), 'logit_adjust'))
    assert info['tau'] in (0.0, 0.5, 1.0) and torch.allclose(head.log_prior, log_prior(COUNTS))
    with pytest.raises(ParamsError, match='la_tau_grid'): RebalanceParams(la_tau_grid=[])
