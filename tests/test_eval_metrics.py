"""The verification metric functions against insightface's protocol, on cases with known answers."""
import numpy as np
import pytest
from scipy import interpolate

from eval import _verification as V


def _reference_fold_accuracy(dist, issame, num_folds=10):
    """insightface's calculate_roc, written as its loops: per-threshold accuracy, first argmax, test accuracy."""
    from sklearn.model_selection import KFold
    thresholds = np.arange(0, 4, 0.01)
    acc, best = [], []
    for train, test in KFold(n_splits=num_folds, shuffle=False).split(np.arange(len(dist))):
        def accuracy(t, d, s):
            p = np.less(d, t)
            tp = np.sum(p & s)
            tn = np.sum(~p & ~s)
            return float(tp + tn) / d.size
        train_acc = [accuracy(t, dist[train], issame[train]) for t in thresholds]
        b = int(np.argmax(train_acc))
        acc.append(accuracy(thresholds[b], dist[test], issame[test]))
        best.append(thresholds[b])
    return np.array(acc), np.array(best)


def _embeddings(num_pairs, dim=16, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < 0.5
    a = rng.normal(size=(num_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(num_pairs, dim)), rng.normal(size=(num_pairs, dim)))
    emb = np.empty((2 * num_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return V.l2_normalize(emb), issame


@pytest.mark.parametrize('num_pairs', [6000, 1003, 57, 10])
def test_fold_layout_matches_sklearn_kfold(num_pairs):
    from sklearn.model_selection import KFold
    ours = V.fold_indices(num_pairs, 10)
    theirs = list(KFold(n_splits=10, shuffle=False).split(np.arange(num_pairs)))
    for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
        np.testing.assert_array_equal(a_train, b_train)
        np.testing.assert_array_equal(a_test, b_test)
    sizes = [len(t) for _, t in ours]
    assert sizes == sorted(sizes, reverse=True) and sum(sizes) == num_pairs
    assert sizes.count(num_pairs // 10 + 1) == num_pairs % 10


@pytest.mark.parametrize('num_pairs, seed', [(600, 0), (1003, 1), (57, 2)])
def test_kfold_accuracy_equals_reference_loops(num_pairs, seed):
    emb, issame = _embeddings(num_pairs, seed=seed)
    dist = V.pair_distances(emb)
    ours = V.kfold_accuracy(dist, issame)
    acc, best = _reference_fold_accuracy(dist, issame)
    np.testing.assert_array_equal(ours['accuracy'], acc)
    np.testing.assert_array_equal(ours['threshold'], best)
    result = V.evaluate(emb, issame)
    assert result['accuracy'] == np.mean(acc) and result['accuracy_std'] == np.std(acc)


def test_hand_computed_case():
    # 10 pairs, one per fold; distances 0.1 (same) and 3.0 (different) except one hard positive at 2.0
    dist = np.array([0.1, 3.0, 0.1, 3.0, 0.1, 3.0, 0.1, 3.0, 2.0, 3.0])
    issame = np.array([True, False] * 5)
    out = V.kfold_accuracy(dist, issame)
    # folds that train with the hard positive (2.0) need t in (2.0, 3.0]: the first grid point is 2.01;
    # fold 8 trains without it, so its first best threshold is 0.11, which then misses that positive
    assert out['threshold'][0] == pytest.approx(2.01)
    assert out['threshold'][8] == pytest.approx(0.11)
    np.testing.assert_array_equal(out['accuracy'], [1, 1, 1, 1, 1, 1, 1, 1, 0, 1])
    assert np.mean(out['accuracy']) == 0.9


def test_threshold_at_far_matches_scipy_without_repeats():
    rng = np.random.default_rng(0)
    far = np.sort(rng.random(200))
    far[0] = 0.0
    thresholds = np.arange(200) * 0.02
    for target in (1e-3, 0.05, 0.3, far[17], far[-1]):
        expected = float(interpolate.interp1d(far, thresholds, kind='slinear')(target))
        assert V.threshold_at_far(far, thresholds, target) == expected


def test_threshold_at_far_with_repeated_values():
    # FAR steps 0, 0, 0, 0.5, 0.5, 1: target 0.25 lies between the last 0 (t=0.2) and the first 0.5 (t=0.3)
    far = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 1.0])
    thresholds = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert V.threshold_at_far(far, thresholds, 0.25) == pytest.approx(0.25)
    assert V.threshold_at_far(far, thresholds, 0.0) == pytest.approx(0.2)   # at a repeated knot: its last threshold
    assert V.threshold_at_far(far, thresholds, 0.75) == pytest.approx(0.45)
    with pytest.raises(ValueError):
        V.threshold_at_far(far, thresholds, 1.5)


def test_tar_at_far_on_separable_pairs():
    emb, issame = _embeddings(1000, noise=0.05, seed=3)
    out = V.evaluate(emb, issame)
    assert out['accuracy'] == 1.0
    assert out['tar_at_far'] == 1.0 and out['far'] < 0.01  # FAR granularity of ~100 negatives per fold
    assert out['auc'] == pytest.approx(1.0)


def test_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    emb, issame = _embeddings(500, noise=1.5, seed=4)
    dist = V.pair_distances(emb)
    assert V.roc_auc(dist, issame) == pytest.approx(roc_auc_score(issame, -dist), abs=1e-6)


def test_undefined_metrics_are_none():
    emb, _ = _embeddings(20, seed=5)
    out = V.evaluate(emb, np.ones(20, dtype=bool))  # all positive pairs, like small_lfw.bin
    assert out['tar_at_far'] is None and out['auc'] is None
    assert 0 <= out['accuracy'] <= 1


def test_flip_rule_sums_raw_outputs_then_normalizes():
    raw = np.array([[10.0, 0.0], [0.0, 1.0]])
    flipped = np.array([[0.0, 1.0], [1.0, 0.0]])
    combined = V.combine_views(raw, flipped)
    np.testing.assert_allclose(combined[0], np.array([10.0, 1.0]) / np.hypot(10, 1))
    # normalizing each view first would give the first row (1, 1) / sqrt(2)
    assert not np.allclose(combined[0], np.array([1.0, 1.0]) / np.sqrt(2))
    np.testing.assert_allclose(V.combine_views(raw), V.l2_normalize(raw))
    assert V.xnorm(raw, flipped) == pytest.approx((10 + 1 + 1 + 1) / 4)


def test_bad_shapes():
    with pytest.raises(ValueError, match='expected 20 embeddings'):
        V.evaluate(np.zeros((19, 4)), np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match='cannot make 10 folds'):
        V.fold_indices(5, 10)
