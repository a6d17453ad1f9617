"""Face verification metrics: insightface's 10-fold protocol as pure numpy functions.

Reproduces `recognition/arcface_torch/eval/verification.py` of deepinsight/insightface (MIT) number for number:
squared L2 distance of L2-normalized embeddings, thresholds `np.arange(0, 4, 0.01)`, contiguous folds in
`KFold(n_splits, shuffle=False)` order, the *first* best training-fold threshold, "same" when `dist < threshold`;
TAR@FAR on the `np.arange(0, 4, 0.001)` grid with `interp1d(far, thresholds, kind='slinear')`. Counting uses sorted
distances and `searchsorted` instead of a Python loop over thresholds: the same integer counts, so the same floats.

Where insightface's code cannot answer (a fold without negative pairs divides by zero; scipy >= 1.11 rejects the
repeated FAR values that `interp1d` used to accept) these functions return None or, for repeated FAR values,
interpolate exactly as scipy's linear spline did with repeated knots: between the last threshold of the lower FAR
value and the first threshold of the next one.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ACC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


def fold_indices(num_pairs: int, num_folds: int = 10) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of `sklearn.model_selection.KFold(num_folds, shuffle=False)`.

    Contiguous folds; the first `num_pairs % num_folds` folds hold one pair more.
    """
    if num_folds < 2:
        raise ValueError(f'num_folds must be >= 2, got {num_folds}')
    if num_pairs < num_folds:
        raise ValueError(f'{num_pairs} pairs cannot make {num_folds} folds')
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[:num_pairs % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.arange(num_pairs)
    return [(np.concatenate([indices[:start], indices[stop:]]), indices[start:stop])
            for start, stop in zip(bounds[:-1], bounds[1:])]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each interleaved pair (rows 2i and 2i+1) of L2-normalized embeddings."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    diff = embeddings[0::2] - embeddings[1::2]
    return np.sum(np.square(diff), 1)


def _counts_below(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of `values` are strictly below each threshold."""
    return np.searchsorted(np.sort(values), thresholds, side='left')


def confusion_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray):
    """tp, fp, tn, fn for every threshold (prediction: same when dist < threshold)."""
    issame = np.asarray(issame, dtype=bool)
    tp = _counts_below(dist[issame], thresholds)
    fp = _counts_below(dist[~issame], thresholds)
    fn = issame.sum() - tp
    tn = (~issame).sum() - fp
    return tp, fp, tn, fn


def accuracy_curve(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray = ACC_THRESHOLDS):
    """tpr, fpr, accuracy at every threshold, as insightface's calculate_accuracy (0 where undefined)."""
    tp, fp, tn, fn = confusion_counts(dist, issame, thresholds)
    with np.errstate(invalid='ignore', divide='ignore'):
        tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
        fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    acc = (tp + tn) / dist.size
    return tpr, fpr, acc


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, num_folds: int = 10,
                   thresholds: np.ndarray = ACC_THRESHOLDS) -> Dict[str, np.ndarray]:
    """insightface's calculate_roc: per-fold test accuracy at the best (first maximal) training threshold.

    Returns:
        dict of `accuracy` and `threshold` (per fold) and the fold-mean `tpr` and `fpr` curves.
    """
    issame = np.asarray(issame, dtype=bool)
    folds = fold_indices(len(dist), num_folds)
    accuracy = np.zeros(num_folds)
    best = np.zeros(num_folds)
    tprs = np.zeros((num_folds, len(thresholds)))
    fprs = np.zeros((num_folds, len(thresholds)))
    for i, (train, test) in enumerate(folds):
        _, _, acc_train = accuracy_curve(dist[train], issame[train], thresholds)
        best_idx = int(np.argmax(acc_train))
        tprs[i], fprs[i], acc_test = accuracy_curve(dist[test], issame[test], thresholds)
        accuracy[i] = acc_test[best_idx]
        best[i] = thresholds[best_idx]
    return dict(accuracy=accuracy, threshold=best, tpr=tprs.mean(0), fpr=fprs.mean(0))


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """`interp1d(far, thresholds, kind='slinear')(far_target)` for a non-decreasing `far`, repeated values included.

    Repeated FAR values are knots of multiplicity > 1: the target falls between the last threshold of the largest
    FAR value <= target and the first threshold of the next larger value (what scipy's linear spline computed
    before it began to refuse repeated x).
    """
    far = np.asarray(far, dtype=np.float64)
    if far_target < far[0] or far_target > far[-1]:
        raise ValueError(f'far_target {far_target} outside [{far[0]}, {far[-1]}]')
    if far_target == far[-1]:
        # the end point: scipy gave the last threshold (NaN when the last value repeats); here the first threshold
        # that reaches it, the same where scipy was defined
        return float(thresholds[int(np.searchsorted(far, far_target, side='left'))])
    lo = int(np.searchsorted(far, far_target, side='right')) - 1
    hi = lo + 1
    # scipy's own linear spline on that interval, so the threshold matches insightface's to the last bit
    from scipy import interpolate  # here: its import is 0.6 s of every eval command's start
    segment = interpolate.interp1d(far[lo:hi + 1], thresholds[lo:hi + 1], kind='slinear')
    return float(segment(far_target))


def kfold_tar_at_far(dist: np.ndarray, issame: np.ndarray, far_target: float = FAR_TARGET, num_folds: int = 10,
                     thresholds: np.ndarray = VAL_THRESHOLDS) -> Optional[Dict[str, float]]:
    """insightface's calculate_val: TAR at the training-fold threshold that gives FAR = far_target.

    Returns:
        dict of `tar`, `tar_std` and `far` (fold means, std with ddof=0), or None when a fold has no positive or
        no negative pairs (insightface divides by zero there).
    """
    issame = np.asarray(issame, dtype=bool)
    folds = fold_indices(len(dist), num_folds)
    tar = np.zeros(num_folds)
    far = np.zeros(num_folds)
    for i, (train, test) in enumerate(folds):
        for part in (train, test):
            if issame[part].all() or not issame[part].any():
                return None
        _, fp, _, _ = confusion_counts(dist[train], issame[train], thresholds)
        far_train = fp / float((~issame[train]).sum())
        threshold = threshold_at_far(far_train, thresholds, far_target) if far_train.max() >= far_target else 0.0
        d, s = dist[test], issame[test]
        predict = np.less(d, threshold)
        tar[i] = float(np.sum(predict & s)) / float(np.sum(s))
        far[i] = float(np.sum(predict & ~s)) / float(np.sum(~s))
    return dict(tar=float(np.mean(tar)), tar_std=float(np.std(tar)), far=float(np.mean(far)))


def roc_auc(dist: np.ndarray, issame: np.ndarray) -> Optional[float]:
    """Area under the ROC curve of the score -dist (torchmetrics' BinaryAUROC); None with only one class."""
    issame = np.asarray(issame, dtype=bool)
    if issame.all() or not issame.any():
        return None
    import torch
    from torchmetrics.functional.classification import binary_auroc
    return float(binary_auroc(torch.from_numpy(-dist), torch.from_numpy(issame.astype(np.int64))))


def equal_error_rate(dist: np.ndarray, issame: np.ndarray) -> Optional[float]:
    """The rate where false accepts equal false rejects over all pairs (CFP's readme asks for it beside accuracy and
    AUC): on torchmetrics' ROC of the score -dist, linearly interpolated between the two operating points where
    FNR - FPR changes sign. None with only one class."""
    issame = np.asarray(issame, dtype=bool)
    if issame.all() or not issame.any():
        return None
    import torch
    from torchmetrics.functional.classification import binary_roc
    fpr, tpr, _ = binary_roc(torch.from_numpy(-np.asarray(dist, dtype=np.float64)),
                             torch.from_numpy(issame.astype(np.int64)))
    fpr, fnr = fpr.double().numpy(), 1 - tpr.double().numpy()
    gap = fnr - fpr  # falls from 1 (threshold above every score) to -1 (below every score)
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (sklearn.preprocessing.normalize: zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def combine_views(raw: np.ndarray, raw_flipped: Optional[np.ndarray] = None) -> np.ndarray:
    """insightface's flip rule: raw output + raw output of the flipped image, summed in float64, then normalized."""
    total = np.asarray(raw, dtype=np.float64)
    if raw_flipped is not None:
        total = total + np.asarray(raw_flipped, dtype=np.float64)
    return l2_normalize(total)


def xnorm(*views: np.ndarray) -> float:
    """Mean L2 norm of the raw (unnormalized) outputs over every view given."""
    norms = np.concatenate([np.linalg.norm(np.asarray(v, dtype=np.float64), axis=1) for v in views])
    return float(norms.mean())


def evaluate(embeddings: np.ndarray, issame: Sequence[bool], num_folds: int = 10,
             far_target: float = FAR_TARGET) -> Dict:
    """The verification metrics of normalized, interleaved embeddings (rows 2i, 2i+1 = pair i).

    Returns:
        dict with `accuracy` and `accuracy_std` (fold mean and std, ddof=0), per-fold `accuracies` and
        `thresholds`, `tar_at_far` (None where undefined), `far`, `auc`, `eer` (equal error rate), and the mean
        `tpr`/`fpr` curves.
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame, dtype=bool)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * len(issame):
        raise ValueError(f'expected {2 * len(issame)} embeddings (2 per pair) as a 2-D array, '
                         f'got shape {embeddings.shape}')
    dist = pair_distances(embeddings)
    roc = kfold_accuracy(dist, issame, num_folds)
    val = kfold_tar_at_far(dist, issame, far_target, num_folds)
    return dict(
        accuracy=float(np.mean(roc['accuracy'])),
        accuracy_std=float(np.std(roc['accuracy'])),
        accuracies=roc['accuracy'].tolist(),
        thresholds=roc['threshold'].tolist(),
        tar_at_far=None if val is None else val['tar'],
        tar_at_far_std=None if val is None else val['tar_std'],
        far=None if val is None else val['far'],
        far_target=far_target,
        auc=roc_auc(dist, issame),
        eer=equal_error_rate(dist, issame),
        tpr=roc['tpr'],
        fpr=roc['fpr'],
    )
