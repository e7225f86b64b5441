"The model contract the train, rebalance and predict stages rely on: shapes, weights, normalisation, state-dict round trip"
import os
import pytest, timm, torch
import torch.nn.functional as F
from aliprod.rundirs import atomic_torch_save
from aliprod.models import (HEADS, REPORT_BACKBONES, BNNeck, create_model, data_config, model_splitter,
                            package_state_dict, PACKAGE_WEIGHTS)

X = torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize('head', list(HEADS))
@pytest.mark.parametrize('embed_dim', [None, 16])
@pytest.mark.parametrize('bnneck', [False, True])
def test_every_head_shapes_and_consistency(head, embed_dim, bnneck):
    m = create_model('resnet18', 6, head=head, embed_dim=embed_dim, bnneck=bnneck).eval()
    D = embed_dim or m.backbone.num_features
    assert m.classifier.weight.shape == (6, D) and m.embedding_dim == D
    with torch.no_grad():
        fmap = m.forward_features(X)
        feats, logits = m.forward_head(fmap, pre_logits=True), m.forward_head(fmap)
        assert feats.shape == (2, D) and logits.shape == (2, 6) and fmap.shape[1] == m.num_features
        torch.testing.assert_close(m.classifier(feats), m(X))
        torch.testing.assert_close(logits, m(X))
    if bnneck:
        assert isinstance(m.neck.bnneck, BNNeck) and getattr(m.classifier, 'bias', None) is None
        assert 'bias' not in dict(m.neck.bnneck.named_parameters())


def test_state_dict_round_trip_keeps_weights_and_normalisation(tmp_path):
    "model.pth is loaded with weights_only=True into a model built with pretrained=False: same logits, same mean/std"
    m = create_model('efficientnet_lite0', 4, embed_dim=8, bnneck=True, head='cosine', pretrained=True).eval()
    atomic_torch_save(m.state_dict(), tmp_path/'model.pth')
    m2 = create_model('efficientnet_lite0', 4, embed_dim=8, bnneck=True, head='cosine', pretrained=False).eval()
    m2.load_state_dict(torch.load(tmp_path/'model.pth', weights_only=True), strict=True)
    assert data_config(m2)['mean'] == data_config(m2)['std'] == (0.5, 0.5, 0.5)
    with torch.no_grad(): torch.testing.assert_close(m2(X), m(X))


def test_local_weights_refused_on_wrong_shape_or_missing_key(tmp_path):
    sd = timm.create_model('resnet18', pretrained=False).state_dict()
    bad = dict(sd, **{'layer3.0.conv1.weight': torch.zeros(256, 128, 1, 1)})
    torch.save(bad, tmp_path/'shape.pth')
    with pytest.raises(ValueError, match=r"'layer3.0.conv1.weight' has shape \(256, 128, 1, 1\) in the file but \(256, 128, 3, 3\)"):
        create_model('resnet18', 3, pretrained=True, weights=tmp_path/'shape.pth')
    del sd['bn1.weight']
    torch.save(sd, tmp_path/'missing.pth')
    with pytest.raises(ValueError, match="lacks key 'bn1.weight'"):
        create_model('resnet18', 3, pretrained=True, weights=tmp_path/'missing.pth')


def test_package_weights_map_onto_timm_lite0():
    pw = PACKAGE_WEIGHTS['efficientnet_lite0']
    assert pw.available() and pw.path().is_file()
    m = create_model('efficientnet_lite0', 3, pretrained=True)
    assert m.pretrained_source == 'package' and (pw.mean, pw.std) == ((0.5,) * 3, (0.5,) * 3)
    assert not torch.allclose(m.backbone.bn2.running_var, torch.ones_like(m.backbone.bn2.running_var))
    ref = timm.create_model('efficientnet_lite0', pretrained=False)
    full = package_state_dict('efficientnet_lite0', ref, include_classifier=True)
    assert full['classifier.weight'].shape == (1000, 1280)
    assert all(torch.equal(v, full[k]) for k, v in m.backbone.state_dict().items())


def test_unknown_arch_suggests_close_name():
    with pytest.raises(ValueError, match=r"Unknown backbone 'seresnext50_32x4'; did you mean 'seresnext50_32x4d'\?"):
        create_model('seresnext50_32x4', 3)
    with pytest.raises(ValueError, match=r"Unknown backbone 'efficientnet_lite00'; did you mean 'efficientnet_lite0'\?"):
        create_model('efficientnet_lite00', 3)


def test_report_backbones_are_timm_names():
    assert all(timm.is_model(a) for a in REPORT_BACKBONES)


def test_splitter_trains_head_only_after_freeze():
    m = create_model('resnet18', 5, embed_dim=8, bnneck=True)
    body, head = model_splitter(m)
    assert len(body) == len(list(m.backbone.parameters())) and any(p is m.classifier.weight for p in head)
    assert all(p is not m.neck.bnneck.bias for p in head)  # BNNeck's shift never reaches an optimiser


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get('ALIPROD_SLOW_TESTS')),
                    reason='torch.compile takes ~50 s on one CPU core; set ALIPROD_SLOW_TESTS=1 (runs on GPU machines)')
def test_torch_compile_matches_eager():
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    m = create_model('efficientnet_lite0', 5, embed_dim=16, bnneck=True, head='cosine').eval().to(dev)
    x = torch.randn(2, 3, 64, 64, device=dev)
    with torch.no_grad(): torch.testing.assert_close(torch.compile(m)(x), m(x), atol=1e-3, rtol=1e-3)
