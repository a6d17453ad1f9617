"""eval as a library: the one public module of `eval/` (training, benchmarks and scripts import these names; the
`eval.*` CLIs parse their flags into them and call them).

    from eval.api import EmbedOptions, ModelSpec, load_datasets, load_model, verify
    embedder = load_model(ModelSpec('mobileone_112_s0', checkpoint='best.safetensors', device='cpu'))
    result = verify(embedder, load_datasets(['lfw.bin']), EmbedOptions(batch_size=128))
    result.results[0]['accuracy'], result.to_json()          # the JSON `python -m eval.verify` prints

What a model is: `ModelSpec` (a timm model and its weights) or `ArtifactSpec` (an exported model and its runtime);
`load_model(spec) -> Embedder`, or `wrap_model(module)` for a model already built. Embedding: `embed(embedder,
dataset, options) -> Embeddings` (a verification set) and `embed_batches` (any dataset of image items, streamed).
Data: `load_datasets(paths)` (packs, aligned folders, raw photo folders and CFP roots, aligned per `Alignment`),
`find_packs(data_dir, names)`. Verification: `verify(embedder, datasets)` and `verify_embeddings(files, datasets)`
give a `VerificationResult` (`.to_json()`: exactly the CLIs' JSON); `score` and `pair_metrics` score embeddings
already made; `verify_command` is the eval.verify command line that reproduces a checkpoint's result. Readers the
CLIs use on hostile input are public for the fuzz targets: `read_cfp_pairs`, `read_ijb_meta`, `ijb_pair_scores`.

Errors a user can cause raise `timm_mobileone.errors.UserError` (one line; the CLIs print it as `error: ...`);
a pack or pairs file that cannot be read raises `timm_mobileone.verification_data.PackError` (a UserError).
"""
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from timm_mobileone.verification_data import VerificationSet, read_embeddings

from . import _verification as V
from ._data import Alignment, find_packs, load_datasets
from ._embed import DEFAULT_WORKERS, Batch, EmbedOptions, Embeddings, embed, embed_batches
from ._photos import CFP_PROTOCOLS
from ._model import ArtifactModel, ArtifactSpec, Embedder, ModelSpec, Spec, load_model, wrap_model
from ._plots import plot_verification
from ._result import VerificationResult, save_embeddings, versions
from ._scoring import dataset_result, resolve_folds
from ._scoring import score as _score

__all__ = [
    # what a model is, and loading it
    'ModelSpec', 'ArtifactSpec', 'Spec', 'Embedder', 'ArtifactModel', 'load_model', 'wrap_model',
    # embedding
    'EmbedOptions', 'Batch', 'Embeddings', 'embed', 'embed_batches', 'DEFAULT_WORKERS',
    # data
    'VerificationSet', 'Alignment', 'find_packs', 'load_datasets',
    # verification
    'VerificationResult', 'verify', 'verify_embeddings', 'verify_command', 'score', 'pair_metrics',
    'combine_views', 'l2_normalize',
    # readers (fuzzed)
    'CFP_PROTOCOLS', 'read_cfp_pairs', 'read_ijb_meta', 'ijb_pair_scores',
]

_logger = logging.getLogger('eval')

combine_views = V.combine_views  # insightface's flip rule: raw + raw of the flip, summed in float64, normalized
l2_normalize = V.l2_normalize
pair_metrics = V.evaluate  # the 10-fold metrics of normalized, interleaved embeddings (rows 2i, 2i+1 = pair i)


def score(dataset: VerificationSet, embeddings: np.ndarray, num_folds: Optional[int] = None) -> Dict[str, Any]:
    """insightface's 10-fold metrics of `dataset`'s pairs from their normalized, interleaved embeddings (2N x D):
    `pair_metrics`'s dict plus `single_class_folds`, `num_folds` and `folds_from` (`num_folds` None: the count the
    data declares (pairs.txt header, CFP's folds), else 10)."""
    folds = resolve_folds(dataset, num_folds)
    return dict(_score(dataset, embeddings, folds[0]), num_folds=folds[0], folds_from=folds[1])


def _sha256(path: str) -> Optional[str]:
    from timm_mobileone.files import sha256_file
    try:
        return sha256_file(path)
    except OSError:
        return None


def _setup(model: Optional[str], tag: Optional[str], spec: Optional[Spec], embeddings: Optional[List[str]],
           flip: bool, data_cfg: Optional[Dict], results: List[Dict], num_folds: Optional[int]) -> Dict[str, Any]:
    artifact = spec if isinstance(spec, ArtifactSpec) else None
    # an artifact is named by itself (path, runtime, sha256), not by the model whose input cfg it was given: a
    # third-party ncnn file is not 'mobileone_112_s0', 'untrained'
    named = dict(artifact_sha256=_sha256(artifact.path), input_cfg_from=artifact.model) if artifact is not None \
        else {}
    return dict(
        model=None if artifact is not None else model,
        tag=None if artifact is not None else tag,
        **named,
        onnx=artifact.path if artifact is not None and artifact.via_onnx_flag else None,
        runtime=artifact.runtime if artifact is not None else ('pytorch' if spec is not None else None),
        artifact=artifact.path if artifact is not None else None,
        checkpoint=(spec.checkpoint or None) if isinstance(spec, ModelSpec) else None,
        embeddings=embeddings,
        flip=flip,
        reparam=bool(isinstance(spec, ModelSpec) and spec.reparam),
        input_size=list(data_cfg['input_size']) if data_cfg else None,
        preprocessing=None if not data_cfg else dict(
            pixels='0..255' if data_cfg.get('raw_pixels') else 'normalized', mean=list(data_cfg['mean']),
            std=list(data_cfg['std']), channel_order=data_cfg.get('channel_order', 'rgb')),
        num_folds=results[0]['num_folds'] if len(results) == 1 else num_folds,
    )


def _score_sets(datasets: Sequence[VerificationSet], embeddings_of, num_folds: Optional[int], save: str,
                plot: str) -> List[Dict[str, Any]]:
    """Score each set with `embeddings_of(i, set) -> (normalized embeddings, xnorm, images/s or None)`."""
    results, curves = [], []
    for i, ds in enumerate(datasets):
        t0 = time.perf_counter()
        embeddings, x_norm, images_per_s = embeddings_of(i, ds, t0)
        folds = resolve_folds(ds, num_folds)
        metrics = _score(ds, embeddings, folds[0])
        if save:
            save_embeddings(save, ds.name, embeddings, len(datasets) > 1)
        results.append(dataset_result(ds, metrics, x_norm, time.perf_counter() - t0, images_per_s, folds))
        curves.append((ds.name, metrics))
        _logger.info(f"{ds.name}: accuracy {metrics['accuracy']:.5f} +- {metrics['accuracy_std']:.5f}")
    if plot:
        plot_verification(plot, curves)
    return results


def verify(embedder: Embedder, datasets: Sequence[VerificationSet], options: EmbedOptions = EmbedOptions(), *,
           num_folds: Optional[int] = None, save_embeddings: str = '', plot: str = '') -> VerificationResult:
    """eval.verify's protocol on each set: embed every image (and its flip, `options.flip`; summed, then
    normalized), insightface's 10-fold metrics. `num_folds`: the cross-validation folds (default: what the data
    declares, else 10); `save_embeddings`: write the normalized embeddings the metric saw (PATH, or
    PATH_<dataset>.npy for several sets); `plot`: a ROC plot (PNG)."""
    t_start = time.perf_counter()

    def embeddings_of(i, ds, t0):
        _logger.info(f'{ds.name}: embedding {len(ds.images)} images from {ds.source}')
        raw, raw_flip, _ = embed(embedder, ds, options)
        x_norm = V.xnorm(raw, raw_flip) if raw_flip is not None else V.xnorm(raw)
        return V.combine_views(raw, raw_flip), x_norm, len(ds.images) / max(time.perf_counter() - t0, 1e-9)

    results = _score_sets(datasets, embeddings_of, num_folds, save_embeddings, plot)
    setup = _setup(embedder.spec.model, embedder.tag, embedder.spec, None, bool(options.flip), embedder.data_cfg,
                   results, num_folds)
    return VerificationResult(setup=setup, results=results, seconds=round(time.perf_counter() - t_start, 3),
                              versions=versions())


def verify_embeddings(files: Sequence[Union[str, Path]], datasets: Sequence[VerificationSet], *,
                      num_folds: Optional[int] = None, save_embeddings: str = '',
                      plot: str = '') -> VerificationResult:
    """`verify` on precomputed embeddings: one .npy file (2N x D, interleaved pairs, raw or normalized) per set, in
    order; the labels come from the sets."""
    from timm_mobileone.errors import UserError
    t_start = time.perf_counter()
    if len(files) != len(datasets):
        raise UserError(f'{len(files)} --embeddings files for {len(datasets)} datasets')

    def embeddings_of(i, ds, t0):
        raw = read_embeddings(files[i], ds.num_pairs)
        return V.l2_normalize(raw), V.xnorm(raw), None

    results = _score_sets(datasets, embeddings_of, num_folds, save_embeddings, plot)
    setup = _setup(None, None, None, [str(f) for f in files], False, None, results, num_folds)
    return VerificationResult(setup=setup, results=results, seconds=round(time.perf_counter() - t_start, 3),
                              versions=versions())


def verify_command(model: str, checkpoint: str, data: Sequence[Union[str, Path]],
                   batch_size: int = 64) -> Dict[str, Any]:
    """`command` (the local command line) and `rerun` (the portable one, see timm_mobileone.results) of eval.verify
    on a checkpoint: what a result of `verify` records so that it can be reproduced from the weights alone
    (`dataclasses.replace(result, **verify_command(...))`, or `result.to_json()` updated with it)."""
    from .verify import command_line
    return command_line(model, checkpoint, [str(p) for p in data], batch_size)


# ----------------------------------------------------------------------------------------------------------------
# readers of hostile input (benchmarks/fuzz_targets.py drives them through these names)


def read_cfp_pairs(root: Union[str, Path], protocol: str) -> Tuple[List[str], np.ndarray, int]:
    """CFP's own protocol files under `root` (Protocol/Pair_list_*.txt, Protocol/Split/<protocol>/NN/): (image
    paths relative to the root, is-same per pair, fold count); PackError naming the file and line otherwise."""
    from ._photos import read_cfp
    return read_cfp(Path(root), protocol)


def read_ijb_meta(data_dir: Union[str, Path], target: str = 'IJBC', landmarks: bool = True):
    """insightface's IJB-B/C meta files under `data_dir` (`_ijb.IJBMeta`: names, templates, medias, pairs,
    landmarks, faceness); PackError naming the file and line otherwise."""
    from ._ijb import read_meta
    return read_meta(Path(data_dir), target, landmarks=landmarks)


def ijb_pair_scores(meta, features: np.ndarray) -> np.ndarray:
    """eval.ijb's pair scores from per-image features (N x D, in the meta's image order): media-averaged, summed
    template features, L2-normalized dot products of the listed pairs."""
    from ._ijb import TemplatePooler, pair_scores
    pooler = TemplatePooler(meta.templates, meta.medias)
    pooler.add(0, np.asarray(features, dtype=np.float32))
    return pair_scores(pooler.template_features(), pooler.unique_templates, meta.p1, meta.p2)
