"DCL and LIO (aliprod.finegrained): the region confusion mechanism, the heads' shapes and targets, gradients, and inference parity"
import copy, math
import numpy as np, pytest, torch, timm
from torch import nn
import torch.nn.functional as F
from aliprod.finegrained import (neighbourhood_permutation, region_confusion_permutation, shuffle_patches, unshuffle_patches,
                                 patch_coordinates, dcl_net, lio_net, dcl_losses, lio_losses, object_extent_target, polar_targets,
                                 unwrap_model, DCLCallback, LIOCallback, FinegrainedParams)
from aliprod.models import create_model


@pytest.fixture(autouse=True)
def _own_rng():
    "Tests seed torch for repeatability; the global RNG is restored after each, so no test changes the next one's"
    with torch.random.fork_rng(devices=[]): yield


@pytest.mark.parametrize('n,k', [(7, 2), (7, 3), (6, 6), (4, 1), (3, 2), (2, 2)])
def test_shuffle_is_a_neighbourhood_permutation(n, k):
    perm = region_confusion_permutation(128, n, k, torch.Generator().manual_seed(n * 10 + k))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(n * n).expand(128, -1)), 'not a permutation of the regions'
    dst = torch.arange(n * n)
    assert (perm // n - dst // n).abs().max() <= k - 1, 'a region moved more than k-1 rows'
    assert (perm % n - dst % n).abs().max() <= k - 1, 'a region moved more than k-1 columns'
    if k == 1: assert torch.equal(perm, dst.expand(128, -1))
    else: assert (perm != dst).any(1).float().mean() > 0.25, 'k > 1 must often shuffle (n=2, k=2: 1-(7/8)^4 = 41% of images)'


def test_neighbourhood_permutation_reaches_the_bound():
    "With k=3 some element moves by exactly 2 places: the bound is tight, not an artefact of a weaker shuffle"
    p = neighbourhood_permutation(10, 3, (2000,), torch.Generator().manual_seed(0))
    assert (p - torch.arange(10)).abs().max() == 2
    with pytest.raises(ValueError, match='k must be'): neighbourhood_permutation(5, 0)


def test_inverse_restores_exactly_and_regions_move_whole():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 61, 45, generator=g)
    for n, k in [(7, 2), (4, 4), (3, 2)]:
        perm = region_confusion_permutation(3, n, k, g)
        xs = shuffle_patches(x, perm, n)
        assert torch.equal(unshuffle_patches(xs, perm, n), x)
        ph, pw = 61 // n, 45 // n
        for b in range(3):
            for p in range(n * n):
                s = int(perm[b, p])
                assert torch.equal(xs[b, :, (p // n) * ph:(p // n + 1) * ph, (p % n) * pw:(p % n + 1) * pw],
                                   x[b, :, (s // n) * ph:(s // n + 1) * ph, (s % n) * pw:(s % n + 1) * pw])


def test_construction_target_matches_the_shuffle():
    "Paint every region with its own (row, col) code, destruct, read back: that is the alignment target"
    n = 5
    grid = patch_coordinates(torch.arange(n * n)[None], n)
    img = F.interpolate(grid, scale_factor=6, mode='nearest').repeat(4, 1, 1, 1)
    perm = region_confusion_permutation(4, n, 3, torch.Generator().manual_seed(2))
    got = F.avg_pool2d(shuffle_patches(img, perm, n), 6)
    assert torch.allclose(got, patch_coordinates(perm, n), atol=1e-6)
    assert grid.min() == -1 and grid.max() == 1


def test_lio_shapes_and_targets():
    torch.manual_seed(0)
    net = lio_net(timm.create_model('resnet18', num_classes=5), structure_channels=32).train()
    x, y = torch.randn(5, 3, 96, 96), torch.tensor([0, 0, 1, 1, 4])
    out = net(x)
    a = net.aux
    assert out.shape == (5, 5)
    assert a['fmap'].shape == (5, 512, 3, 3) and a['mask'].shape == (5, 3, 3) and a['object'].shape == (5, 3, 3)
    assert a['object'].dtype == torch.bool and a['centre'].shape == (5,) and a['polar'].shape == (5, 3, 3, 2)
    t, has = object_extent_target(a['fmap'], y)
    assert t.shape == (5, 3, 3) and has.tolist() == [True, True, True, True, False]
    f = a['fmap'].flatten(2).transpose(1, 2)
    assert torch.allclose(t[0].flatten(), (f[0] @ f[1].T / 512).amax(1), atol=1e-5)
    pt = polar_targets(torch.tensor([0]), 3, 3)  # centre top-left
    assert torch.allclose(pt[0, 2, 2], torch.tensor([math.sqrt(8) / 3, 0.625]))
    assert torch.allclose(pt[0, 0, 0], torch.tensor([0., 0.5]))


@pytest.mark.parametrize('method', ['dcl', 'lio'])
def test_losses_reach_the_backbone(method):
    torch.manual_seed(0)
    model = create_model('resnet18', 4, pretrained=False)
    net = (dcl_net(model, 3) if method == 'dcl' else lio_net(model)).train()
    x, y = torch.randn(4, 3, 96, 96), torch.tensor([0, 0, 1, 1])
    if method == 'dcl':
        perm = region_confusion_permutation(4, 3, 2)
        net(torch.cat([x, shuffle_patches(x, perm, 3)]))
        losses = dcl_losses(net.aux, perm)
    else:
        net(x); losses = lio_losses(net.aux, y)
    assert set(losses) == ({'adversarial', 'alignment'} if method == 'dcl' else {'object_extent', 'spatial_context'})
    for name in losses:
        net.zero_grad()
        losses[name].backward(retain_graph=True)
        g = model.backbone.conv1.weight.grad
        assert g is not None and g.abs().sum() > 0, f'{name} is not differentiable w.r.t. the backbone'


@pytest.mark.parametrize('method', ['dcl', 'lio'])
def test_eval_forward_is_the_plain_forward(method):
    torch.manual_seed(3)
    model = create_model('resnet18', 6, embed_dim=32, bnneck=True, pretrained=False)
    ref = copy.deepcopy(model)
    net = dcl_net(model, 2) if method == 'dcl' else lio_net(model)
    net.train(); net(torch.randn(4, 3, 64, 64))            # training forward updates BN statistics of the shared model ...
    ref.train(); ref(torch.randn(4, 3, 64, 64))
    ref.load_state_dict(model.state_dict())                  # ... so compare against the same weights
    net.eval(); ref.eval()
    calls = []
    for m in net.heads.modules(): m.register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(): a, b = net(x), ref(x)
    assert a.shape == b.shape == (3, 6) and torch.equal(a, b) and not calls
    assert unwrap_model(net) is model
    assert sum(p.numel() for p in unwrap_model(net).parameters()) == sum(p.numel() for p in ref.parameters())
    assert set(unwrap_model(net).state_dict()) == set(ref.state_dict())


def test_callbacks_in_a_fastai_learner_with_product_net():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.optimizer import OptimWrapper
    from fastai.callback.progress import ProgressCallback
    from torch.utils.data import DataLoader, Dataset

    class DS(Dataset):
        def __init__(self, n): self.x, self.labels = torch.randn(n, 3, 64, 64), np.arange(n) % 3
        def __len__(self): return len(self.labels)
        def __getitem__(self, i): return self.x[i], int(self.labels[i])

    for cb in (DCLCallback(num_patches=2), LIOCallback(positives=1)):
        torch.manual_seed(0)
        model = create_model('resnet18', 3, pretrained=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        learn = Learner(DataLoaders(DataLoader(DS(12), batch_size=6, drop_last=True), DataLoader(DS(6), batch_size=6)), model,
                        loss_func=nn.CrossEntropyLoss(), opt_func=lambda *_, **__: OptimWrapper(opt=opt), cbs=[cb])
        learn.remove_cb(ProgressCallback); learn.epoch_metrics = {}
        learn.fit(1)
        assert learn.model is model and len(opt.param_groups) == 2
        assert all(opt.state[q]['momentum_buffer'].abs().sum() > 0 for q in cb.net.heads.parameters())
        assert set(learn.epoch_metrics) == {f'{cb.prefix}_{k}' for k in cb.weights}


def test_params_refuse_bad_values():
    from aliprod.config import ParamsError
    with pytest.raises(ParamsError, match="unknown method 'dcll'"): FinegrainedParams(methods=['dcll'])
    with pytest.raises(ParamsError, match='dcl_patches'): FinegrainedParams(dcl_patches=0)


def test_stage_without_a_test_split(tmp_path):
    "Real AliProducts data has no test labels: the finetunes predict val only and the table compares on val; nothing to compare is refused before training"
    import json
    import aliprod.train as T
    from aliprod.config import ExperimentParams, ParamsError
    from aliprod.data import DataParams
    from aliprod.finegrained import run_finegrained
    exp = ExperimentParams(experiment='notest', seed=1, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    data = DataParams(n_classes=4, family_size=4, max_per_class=24, min_per_class=6, val_per_class=3, test_per_class=0,
                      img_size=48, img_size_max=56, gen_workers=1, scan_workers=1)
    t = T.TrainParams(arch='test_efficientnet', pretrained=False, img_size=64, finetune_size=None, finetune_epochs=0, epochs=1, bs=16,
                      warmup_epochs=0, milestones=[1], eval_splits=['train', 'val'])
    from aliprod.data import prepare_data
    prepare_data(exp, data); T.train_round(exp, data, t)   # what the stage needs (`call_stage` runs them first)
    art = run_finegrained(exp, data, t, FinegrainedParams(methods=['plain', 'dcl']))
    assert art.splits == ['val'] and list(art.table.run) == ['start', 'plain', 'dcl']
    assert not any(c.startswith('test_') for c in art.table.columns) and art.table.val_mean_class_err.notna().all()
    for m in ('plain', 'dcl'):
        assert sorted(art.runs[m].predictions) == ['val'], 'a finetune predicts the labelled splits that exist, nothing else'
    assert json.loads((art.out_dir/'manifest.json').read_text())['metrics']['metrics_split'] == 'val'
    assert art.figure_path.is_file() and (tmp_path/'reports'/'notest'/'finegrained.md').is_file()
    noeval = ExperimentParams(experiment='noeval', seed=1, runs_dir=str(tmp_path/'runs'), reports_dir=str(tmp_path/'reports'))
    prepare_data(noeval, DataParams(**{**data.__dict__, 'val_per_class': 0}))
    with pytest.raises(ParamsError, match='no labelled val or test rows'):
        run_finegrained(noeval, DataParams(**{**data.__dict__, 'val_per_class': 0}), T.TrainParams(**{**t.__dict__, 'eval_splits': ['train']}),
                          FinegrainedParams())
    assert not (tmp_path/'runs'/'noeval'/'train').exists(), 'refused before training'
