"""The embedding loop: an `Embedder` over a dataset of images, batch by batch (`embed_batches`), or over a
verification set into one array (`embed`). Part of eval's public API (`eval.api`)."""
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from timm_mobileone.errors import UserError
from timm_mobileone.verification_data import PackError, PairImages, VerificationSet, collate_images

from ._model import Embedder

# Decoding workers pay off once the model's threads leave cores free: on the 2-core box a worker competing with the
# model's 2 threads made an LFW-size eval 1.24x its forward passes, decoding in the main process 1.11x
# (benchmarks/eval_speed.py, README). The CLIs' --workers default.
DEFAULT_WORKERS = max(0, min(4, (os.cpu_count() or 1) - 2))


@dataclass(frozen=True)
class EmbedOptions:
    """How images are run: `batch_size` images per forward pass (x2 with `flip`), `workers` DataLoader processes
    decoding them (0: in the calling process), `flip` (also embed each image's horizontal flip, insightface's flip
    test), `amp` (autocast: bfloat16 on CPU, float16 on CUDA), `progress` (a tqdm bar on stderr, on a terminal)."""
    batch_size: int = 64
    workers: int = 0
    flip: bool = True
    amp: bool = False
    progress: bool = False


class Batch(NamedTuple):
    """One batch of `embed_batches`: the index of its first image, (n, D) raw outputs, (n, D) raw outputs of the
    flips or None, forward seconds."""
    start: int
    raw: np.ndarray
    raw_flip: Optional[np.ndarray]
    forward_seconds: float


class Embeddings(NamedTuple):
    """`embed`'s result: raw outputs of every image (2N x D for N pairs, interleaved), of their flips or None, and
    the forward seconds. `combine_views(raw, raw_flip)` gives the normalized embeddings the metric sees."""
    raw: np.ndarray
    raw_flip: Optional[np.ndarray]
    forward_seconds: float


@torch.no_grad()
def embed_batches(embedder: Embedder, images: torch.utils.data.Dataset, options: EmbedOptions = EmbedOptions(),
                  name: str = '') -> Iterator[Batch]:
    """Run the embedder over a dataset of (index, uint8 CHW RGB tensor, error message) items, in order.

    Yields a `Batch` per batch. Its arrays are views that the next batch overwrites: copy what you keep. An item that
    carries an error message raises PackError with it. The tqdm bar (stderr, only on a terminal, `name` its label)
    counts images.
    """
    from tqdm import tqdm
    data_cfg = embedder.data_cfg
    model = embedder.model
    flip = options.flip
    mean = torch.tensor(data_cfg['mean'], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg['std'], dtype=torch.float32).view(1, 3, 1, 1)
    loader = torch.utils.data.DataLoader(images, batch_size=options.batch_size, shuffle=False,
                                         num_workers=options.workers, collate_fn=collate_images)
    device = embedder.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == 'cpu' else torch.float16) \
        if options.amp else nullcontext()
    memory_format = torch.channels_last if embedder.channels_last else torch.contiguous_format
    inputs = None
    done = 0
    show = options.progress and sys.stderr.isatty()
    bar = tqdm(total=len(images), desc=name, unit='img', disable=not show, file=sys.stderr)
    try:
        for _, batch, errors in loader:
            if errors:
                raise PackError(errors[0])
            n = len(batch)
            if inputs is None:
                # one input buffer, reused: fresh float copies of every batch fragment the heap when batches
                # arrive from workers through shared memory (RSS grew by 1.5 GB over an LFW-size pack)
                inputs = torch.empty((options.batch_size * (2 if flip else 1), *batch.shape[1:]))
                inputs = inputs.contiguous(memory_format=memory_format)
            views = inputs[:2 * n] if flip else inputs[:n]
            if data_cfg.get('channel_order', 'rgb') == 'bgr':
                batch = batch.flip(1)
            views[:n].copy_(batch)
            if flip:
                views[n:].copy_(batch.flip(3))
            if not data_cfg.get('raw_pixels'):
                # the cfg's normalization, in insightface's order: (x / 255 - mean) / std, float32
                views.div_(255).sub_(mean).div_(std)
            views = views.to(device)
            t0 = time.perf_counter()
            with amp:
                out = model(views)
            out = out.float().cpu()
            forward_s = time.perf_counter() - t0
            if out.ndim != 2:
                raise UserError(f'model {embedder.spec.model!r} returns a {out.ndim}-D output; verification needs '
                                f'(B, D) embeddings (use num_classes=0 and a pooling head)')
            out = out.numpy()
            yield Batch(done, out[:n], (out[n:2 * n] if flip else None), forward_s)
            done += n
            bar.update(n)
    finally:
        bar.close()


def embed(embedder: Embedder, dataset: VerificationSet, options: EmbedOptions = EmbedOptions()) -> Embeddings:
    """Raw outputs of every image of a verification set (and of its horizontal flip): (2N, D), (2N, D) or None,
    forward seconds. Images are decoded and resized to the embedder's input size as eval decodes them."""
    total = len(dataset.images)
    raw = raw_flip = None
    forward_s = 0.0
    for start, out, out_flip, seconds in embed_batches(embedder, PairImages(dataset, embedder.input_size), options,
                                                       dataset.name):
        if raw is None:
            # preallocated and filled by copy: keeping numpy views of each batch's output fragments the heap
            # (RSS grew by about a batch of inputs per batch, 1 GB over an LFW-size pack)
            raw = np.empty((total, out.shape[1]), dtype=np.float32)
            raw_flip = np.empty_like(raw) if out_flip is not None else None
        raw[start:start + len(out)] = out
        if out_flip is not None:
            raw_flip[start:start + len(out)] = out_flip
        forward_s += seconds
    return Embeddings(raw, raw_flip, forward_s)
