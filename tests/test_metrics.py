"""Tests of the paired comparisons in aliprod.metrics: the bootstrap's variance against the formula it estimates, coverage
on an AliProducts-like validation set (about three images per class, many of one), invariance to row order and to swapping
the systems, Δ exactly the difference of two `evaluate`s, memory bounded at AliProducts' K, and the choose/report split
pinned so that it never changes under a report's feet."""
import tracemalloc
import numpy as np, pytest, torch
from aliprod.metrics import (PAIRED_METRICS, PairedHits, choosing_half, evaluate, paired_bootstrap, paired_delta, paired_hits,
                             simulate_paired_hits)
from aliprod.predictions import TopK, topk_from_logits


def two_systems(n=3000, K=60, seed=0, unknown=0.0):
    "Two TopKs of correlated random logits, b somewhat better, and train counts; a share `unknown` of labels is -1"
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    la = torch.randn(n, K, generator=g); la[torch.arange(n), y] += 1.0
    lb = la + 0.7 * torch.randn(n, K, generator=g); lb[torch.arange(n), y] += 1.0
    labels = np.where(np.random.default_rng(seed).random(n) < unknown, -1, y.numpy())
    a, b = topk_from_logits(la, labels, k=5), topk_from_logits(lb, labels, k=5)
    return a, b, np.random.default_rng(seed).integers(0, 300, K)


def coverage(n_per_class, metric='mean_class_err', reps=200, B=400, rescale=True, seed=0):
    "Share of fresh evaluation sets whose interval covers the true Δ of a simulated pair with known per-class accuracies"
    r = np.random.default_rng(seed)
    K = len(n_per_class)
    acc_a = r.uniform(.3, .9, K); acc_b = np.clip(acc_a + r.normal(.03, .05, K), 0, 1)
    weight = n_per_class / n_per_class.sum() if metric == 'top1_err' else np.full(K, 1 / K)
    true = -((acc_b - acc_a) * weight).sum()
    ds = [paired_bootstrap(simulate_paired_hits(n_per_class, acc_a, acc_b, .5, r), metric, B=B, seed=r, rescale=rescale)
          for _ in range(reps)]
    return np.mean([d.lo <= true <= d.hi for d in ds])


@pytest.mark.parametrize('rescale', [True, False])
def test_interval_width_is_the_stratified_variance(rescale):
    "With many draws the 95% interval is ±1.96 sd, the sd the stratified formula gives (unbiased s² or plug-in σ̂²)"
    r = np.random.default_rng(0)
    n = r.integers(2, 12, 300)
    h = simulate_paired_hits(n, r.uniform(.3, .9, 300), r.uniform(.3, .9, 300), .5, r)
    d = (h.hit_b.astype(float) - h.hit_a)
    # per class: variance of the per-image difference, unbiased (ddof=1) or plug-in (ddof=0), over its n_c images
    var = np.array([d[h.y == c].var(ddof=1 if rescale else 0) for c in range(300)])
    sd = np.sqrt((var / n).sum()) / 300
    iv = paired_bootstrap(h, B=20000, seed=1, rescale=rescale)
    assert (iv.hi - iv.lo) / (2 * 1.96 * sd) == pytest.approx(1, abs=0.03)


def test_coverage_on_an_aliproducts_like_validation_set():
    "1 + Poisson(2) images per class (14% of classes with one image): n_c - 1 draws with pooled singletons cover, plain does not"
    n = 1 + np.random.default_rng(0).poisson(2, 500)
    assert 0.9 <= coverage(n, reps=200, seed=0) <= 0.99
    assert coverage(n, reps=200, seed=0, rescale=False) < 0.88


@pytest.mark.parametrize('metric', ['top1_err', 'mean_class_err'])
def test_coverage_long_tail(metric):
    "K=50 classes of 2-39 images: the interval covers the true Δ at about the nominal rate, for image and class means alike"
    n = np.random.default_rng(1).integers(2, 40, 50)
    assert 0.88 <= coverage(n, metric, reps=200, seed=2) <= 0.99


def test_row_order_and_direction():
    "The interval depends on the images, not their order; swapping a and b mirrors Δ exactly and flips the verdict"
    a, b, _ = two_systems()
    p, q = np.random.default_rng(0).permutation(len(a)), np.random.default_rng(1).permutation(len(a))
    d = paired_delta(a, b)
    assert paired_delta(a.take(p), b.take(q)) == d
    back = paired_delta(b, a)
    assert back.delta == -d.delta and back.a == d.b and back.b == d.a
    mirror = {'helped': 'hurt', 'hurt': 'helped', 'no measurable effect': 'no measurable effect'}
    assert back.verdict == mirror[d.verdict] and d.verdict == 'helped'


def test_delta_is_exactly_the_difference_of_evaluates():
    "Every metric, with unknown labels left out and against clean labels: Δ, a and b are evaluate's numbers to the bit"
    a, b, counts = two_systems(unknown=0.1)
    clean = np.where(np.random.default_rng(2).random(len(a)) < 0.05, -1, a.labels)
    for kw in ({}, {'clean_label': clean}):
        ea, eb = evaluate(a, train_counts=counts, many=150, few=50, **kw), evaluate(b, train_counts=counts, many=150, few=50, **kw)
        h = paired_hits(a, b, **kw)
        assert len(h) == ea['n'] and h.n_unknown == ea['n_unknown'] and h.target == ea['target']
        for metric in PAIRED_METRICS:
            d = paired_bootstrap(h, metric, train_counts=counts, many=150, few=50, B=50)
            assert (d.a, d.b, d.delta) == (ea[metric], eb[metric], eb[metric] - ea[metric]), metric


def test_memory_is_linear_at_aliproducts_classes():
    "K = 50,030 classes, 300k images, B = 200: the peak allocation stays far below one (B,K) or (N,K) array"
    K, n = 50_030, 300_000
    r = np.random.default_rng(0)
    y = r.integers(0, K, n)
    h = PairedHits(np.arange(n), y, r.random(n) < .7, r.random(n) < .72, K, 'label', 0)
    tracemalloc.start()
    try:
        d = paired_bootstrap(h, B=200, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally: tracemalloc.stop()
    assert d.lo < d.delta < d.hi and d.n_classes == len(np.unique(y))
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"      # B×K float64 alone would be 76 MiB, N×K 120 GB


def test_choosing_half_is_pinned():
    "The split for a given seed never changes between versions: a report's halves stay the same halves"
    rows = np.arange(100, 130)
    labels = np.r_[np.zeros(7), np.ones(6), np.full(5, 2), [3], np.full(11, 4)].astype(int)
    assert np.flatnonzero(choosing_half(rows, labels, 0)).tolist() == [0, 5, 6, 9, 11, 12, 13, 15, 16, 18, 20, 22, 24, 25, 26, 29]
    assert np.flatnonzero(choosing_half(rows, labels, 5)).tolist() == [2, 3, 4, 5, 8, 9, 10, 16, 17, 18, 19, 21, 22, 24, 26]


def test_choose_then_report():
    "Choosing on one half and reporting on the other: both halves evaluate, the reporting half on every class of two or more"
    a, b, _ = two_systems(n=2000, K=300)
    choose = choosing_half(a.rows, a.labels, seed=0)
    n_c = np.bincount(a.labels, minlength=300)
    report = evaluate(a.take(~choose))
    assert report['n_classes_evaluated'] == (n_c >= 2).sum()
    assert evaluate(a.take(choose))['n_classes_evaluated'] == (n_c >= 1).sum()
    d = paired_delta(a.take(~choose), b.take(~choose))
    assert d.n == (~choose).sum() and d.n_classes == (n_c >= 2).sum()


def test_every_paired_interval_draws_at_least_ten_thousand_times():
    import inspect
    from aliprod.metrics import BOOTSTRAP_DRAWS
    assert BOOTSTRAP_DRAWS >= 10_000
    for f in (paired_bootstrap, paired_delta):
        assert inspect.signature(f).parameters['B'].default == BOOTSTRAP_DRAWS, f.__name__
    a, b, _ = two_systems(n=768, K=64)
    assert paired_delta(a, b).B == BOOTSTRAP_DRAWS


def test_a_missing_interval_is_not_measured_never_no_effect():
    from aliprod.metrics import verdict
    a, b, counts = two_systems(n=500, K=20)
    d = paired_delta(a, b, 'few_acc', train_counts=np.full(20, 500), few=20)   # no few-shot class: no interval
    assert np.isnan(d.lo) and np.isnan(d.p)
    assert d.verdict == 'not measured' and d.to_dict()['verdict'] == 'not measured'
    assert verdict(None) == 'not measured'


@pytest.mark.parametrize('shift', [0.0, 0.02, 0.04, 0.08])
def test_p_value_comes_from_the_interval_draws(shift):
    "p < 1 - level exactly where the interval at that level excludes 0, at every level, from the same seeded draws"
    r = np.random.default_rng(int(shift * 100))
    acc = r.uniform(.3, .9, 64)
    for s in range(4):
        h = simulate_paired_hits(np.full(64, 12), acc, np.clip(acc + shift, 0, 1), .5, s)
        for level in (.8, .9, .95, .99):
            d = paired_bootstrap(h, B=4000, seed=s, level=level)
            assert 2 / 4001 <= d.p <= 1
            side = d.p * 4001 / 2 - 1                                   # draws on the smaller side of 0
            near = abs(side - (1 - level) / 2 * 4000) <= 3               # within a few draws of the interval's end
            assert (d.p < 1 - level) == (d.verdict != 'no measurable effect') or near, (level, d)


def _holm_by_definition(p):
    "max over j <= i of (m - j + 1) p_(j), capped at 1: Holm's adjusted p-values by loops"
    order = sorted(range(len(p)), key=lambda i: p[i]); m = len(p); out = [0.0] * m
    for i, oi in enumerate(order): out[oi] = min(1.0, max((m - j) * p[order[j]] for j in range(i + 1)))
    return out


def _bh_by_definition(p):
    "min over j >= i of m p_(j) / j, capped at 1: Benjamini-Hochberg's adjusted p-values by loops"
    order = sorted(range(len(p)), key=lambda i: p[i]); m = len(p); out = [0.0] * m
    for i, oi in enumerate(order): out[oi] = min(1.0, min(m * p[order[j]] / (j + 1) for j in range(i, m)))
    return out


def test_multiplicity_adjustments():
    from aliprod.metrics import benjamini_hochberg, holm
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])              # by hand
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    r = np.random.default_rng(0)
    for m in (1, 2, 7, 40):
        q = np.where(r.random(m) < .5, r.random(m) * .05, r.random(m))
        np.testing.assert_allclose(holm(q), _holm_by_definition(list(q)), rtol=1e-12)
        np.testing.assert_allclose(benjamini_hochberg(q), _bh_by_definition(list(q)), rtol=1e-12)
    # the p-values of a report's Δs, one not measured: it stays nan and the others are adjusted among themselves
    a, b, counts = two_systems(n=2000, K=40)
    ds = [paired_delta(a, b, m, train_counts=counts, many=200, few=20)
          for m in ("mean_class_err", "top1_err", "few_acc")]
    ps = np.array([d.p for d in ds])
    adj = holm(ps)
    assert np.isnan(adj).tolist() == np.isnan(ps).tolist() and (adj[~np.isnan(ps)] >= ps[~np.isnan(ps)]).all()
    with pytest.raises(ValueError, match='position 1 is outside'): holm([0.1, -0.2])
