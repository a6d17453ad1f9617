"""Scoring one verification set: the fold count, insightface's 10-fold metrics with the single-class-fold check, and
the set's entry of the JSON result. Part of eval's public API (`eval.api`)."""
import logging
from typing import Dict, Optional, Tuple

import numpy as np

from timm_mobileone.errors import UserError
from timm_mobileone.verification_data import VerificationSet

from . import _verification as V

_logger = logging.getLogger('eval')


def resolve_folds(dataset: VerificationSet, num_folds: Optional[int]) -> Tuple[int, str]:
    """(fold count, where it came from): --num-folds, else the pairs.txt header, else insightface's 10."""
    if num_folds is not None:
        return num_folds, '--num-folds'
    if dataset.folds is not None:
        return dataset.folds, dataset.folds_from
    return 10, 'default (insightface)'


def score(dataset: VerificationSet, embeddings: np.ndarray, num_folds: int) -> Dict:
    """`_verification.evaluate`'s metrics of the set's normalized, interleaved embeddings, plus
    `single_class_folds` (warned about: the fold accuracy means nothing there)."""
    if dataset.num_pairs < num_folds:
        raise UserError(f'{dataset.source}: {dataset.num_pairs} pairs cannot make {num_folds} folds '
                        f'(use --num-folds)')
    metrics = V.evaluate(embeddings, dataset.issame, num_folds=num_folds)
    # LFW's lists give each fold's same-person pairs before its different ones: over a subset (or the wrong fold
    # count) a cross-validation fold can hold one class, where a model without signal scores near 0, not 0.5
    single = sum(bool(dataset.issame[test].all() or not dataset.issame[test].any())
                 for _, test in V.fold_indices(dataset.num_pairs, num_folds))
    metrics['single_class_folds'] = single
    if single:
        _logger.warning(f'{dataset.name}: {single} of {num_folds} folds hold pairs of one class only (LFW lists a '
                        f'fold\'s same-person pairs first): the fold accuracy is not meaningful there, the AUC is; '
                        f'use the pairs.txt header\'s fold count (--num-folds)')
    return metrics


def _rounded(x):
    return None if x is None else round(float(x), 5)


def dataset_result(dataset: VerificationSet, metrics: Dict, xnorm: Optional[float], seconds: float,
                   images_per_s: Optional[float], folds: Tuple[int, str]) -> Dict:
    """One entry of the result's `results` list (the JSON every verification CLI prints)."""
    return dict(
        dataset=dataset.name,
        data=dataset.source,
        num_pairs=dataset.num_pairs,
        num_folds=folds[0],
        folds_from=folds[1],
        single_class_folds=metrics.get('single_class_folds', 0),
        accuracy=_rounded(metrics['accuracy']),
        accuracy_std=_rounded(metrics['accuracy_std']),
        accuracies=[_rounded(a) for a in metrics['accuracies']],
        thresholds=[round(t, 5) for t in metrics['thresholds']],
        tar_at_far=_rounded(metrics['tar_at_far']),
        tar_at_far_std=_rounded(metrics['tar_at_far_std']),
        far=_rounded(metrics['far']),
        far_target=metrics['far_target'],
        auc=_rounded(metrics['auc']),
        eer=_rounded(metrics.get('eer')),
        xnorm=None if xnorm is None else round(xnorm, 5),
        seconds=round(seconds, 3),
        images_per_second=None if images_per_s is None else round(images_per_s, 1),
    )
