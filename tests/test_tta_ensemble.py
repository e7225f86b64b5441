"Test-time augmentation views and the batched forward (aliprod.tta); sparse top-k ensembling (aliprod.ensemble)"
import numpy as np, pytest, torch
from aliprod.config import ExperimentParams, ParamsError
from aliprod.predictions import TopK, topk_from_probs, write_topk, read_topk
from aliprod.tta import tta_views, ten_crop, five_crop, tta_probs, VIEWS, TTAParams, parse_variant


# ---------------------------------------------------------------- TTA views

@pytest.mark.parametrize('H,W,s', [(12, 14, 8), (96, 96, 64), (15, 15, 10)])
def test_ten_crop_is_corners_centre_and_flips(H, W, s):
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    v = ten_crop(x, s)
    assert v.shape == (2, 10, 3, s, s)
    tl, tr, bl, br = x[..., :s, :s], x[..., :s, W-s:], x[..., H-s:, :s], x[..., H-s:, W-s:]
    top, left = int(round((H - s) / 2)), int(round((W - s) / 2))
    ctr = x[..., top:top+s, left:left+s]
    for i, c in enumerate([tl, tr, bl, br, ctr]): assert torch.equal(v[:, i], c), f'view {i}'
    xf = x.flip(-1)  # the last five are the five crops of the horizontally flipped image
    for i, c in enumerate([xf[..., :s, :s], xf[..., :s, W-s:], xf[..., H-s:, :s], xf[..., H-s:, W-s:]]): assert torch.equal(v[:, 5 + i], c)
    assert torch.equal(v[:, 9], xf[..., top:top+s, left:left+s])  # = ctr.flip(-1) when W - s is even
    if (W - s) % 2 == 0: assert torch.equal(v[:, 9], ctr.flip(-1))
    assert torch.equal(five_crop(x, s), v[:, :5])

def test_view_counts_and_errors():
    x = torch.randn(3, 3, 20, 20)
    for name, n in VIEWS.items(): assert tta_views(x, 16, name).shape[:2] == (3, n)
    with pytest.raises(ValueError, match='enlarge >= 1'): ten_crop(x, 21)
    with pytest.raises(ValueError, match='Unknown views'): tta_views(x, 16, 'seven')

@pytest.fixture(scope='module', params=['productnet', 'pixels'])
def net(request):
    "A ProductNet (batch norm in eval mode) and a linear model on raw pixels, whose logits differ a lot between views"
    if request.param == 'pixels':
        with torch.random.fork_rng():  # a fixed init that leaves the global generator as it was
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 6)).eval()
    from aliprod.models import create_model
    return create_model('resnet10t', num_classes=6, pretrained=False).eval()

@pytest.mark.parametrize('views', ['ten', 'five', 'flip', 'center'])
def test_batched_forward_equals_view_by_view(net, views):
    x = torch.randn(3, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    calls = []
    h = net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    batched = tta_probs(net, x, 32, views)
    h.remove()
    assert calls == [3 * VIEWS[views]]  # one forward of B·V images
    with torch.inference_mode():
        per_view = torch.stack([net(v) for v in tta_views(x, 32, views).unbind(1)])
    torch.testing.assert_close(batched, per_view.softmax(-1).mean(0), atol=1e-5, rtol=1e-4)  # mean of probabilities, not of logits

def test_an_image_broken_after_the_scan_gets_no_prediction_from_either_path(tmp_path):
    # 4 images, the 2nd corrupted after the scan: train's predict and TTA's predict_tta share one guarded loop
    import pandas as pd
    from PIL import Image
    from aliprod.models import create_model
    from aliprod.inference import predict, eval_transform
    from aliprod.tta import predict_tta
    rng = np.random.default_rng(0)
    for i in range(4): Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path/f'{i}.png')
    idx = pd.DataFrame({'row': np.arange(4), 'path': [f'{i}.png' for i in range(4)], 'label': [0, 1, 2, 3], 'split': 'val'})
    net = create_model('resnet10t', num_classes=5, pretrained=False).eval()
    good_p = read_topk(predict(net, idx, 'val', tmp_path/'p_all.parquet', tmp_path, 32, k=3, bs=2))
    good_t = read_topk(predict_tta(net, idx, 'val', tmp_path/'t_all.parquet', tmp_path, 32, 'ten', 1.25, k=3, bs=2))
    (tmp_path/'1.png').write_bytes(b'\xff\xd8\xff garbage')  # broke after the data stage's scan
    for name, run in (('predict', lambda f: predict(net, idx, 'val', tmp_path/'p.parquet', tmp_path, 32, k=3, bs=2, failed=f)),
                      ('predict_tta', lambda f: predict_tta(net, idx, 'val', tmp_path/'t.parquet', tmp_path, 32, 'ten', 1.25, k=3, bs=2, failed=f))):
        failed = []
        t = read_topk(run(failed))
        good = good_p if name == 'predict' else good_t
        np.testing.assert_array_equal(t.rows, [0, 2, 3], err_msg=name)
        np.testing.assert_allclose(t.topk_probs, good.topk_probs[[0, 2, 3]], atol=1e-5, err_msg=name)  # each row its own scores
        np.testing.assert_allclose(t.p_label, good.p_label[[0, 2, 3]], atol=1e-5, err_msg=name)
        assert [f[0] for f in failed] == [1], name

def test_tta_params():
    assert TTAParams().variants[0] == ('ten', 1.5)
    assert parse_variant('full@1.5') == ('full', 1.5)
    with pytest.raises(ParamsError, match='enlarge >= 1'): TTAParams(compare=['five@0.8'])
    import pandas as pd
    index = pd.DataFrame({'split': ['train', 'val', 'val']})
    assert TTAParams().splits_of(index) == ['val']                       # null: the val/test splits that exist
    with pytest.raises(ParamsError, match="no 'test' rows"): TTAParams(splits=['val', 'test']).splits_of(index)
