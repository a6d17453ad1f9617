"""`train.compare_blocks`' measurements beside accuracy: training cost (a `train.face` step, timed and its memory),
deploy cost, the fused weights' INT8-relevant statistics, INT8 accuracy and agreement with a teacher."""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def _build(spec: Tuple[str, Dict[str, Any]], weights: Optional[str] = None) -> torch.nn.Module:
    import timm
    name, kwargs = spec
    model = timm.create_model(name, num_classes=0, **kwargs)
    if weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights))
    return model


def _step_fn(spec, batch_size: int, num_classes: int, device: torch.device):
    """One step of `train.face`'s recipe at its default flags (float32), on a fixed random batch: its model and loss
    (`FaceTrainModel`: backbone + ArcFace margin head), its optimizer (SGD with momentum, no decay on norm and bias
    parameters), backward and update."""
    from .face import parse_args
    from .margin import MarginHead
    from .optim import build_optimizer
    from .step import FaceTrainModel
    flags = parse_args(['--data', '-', '--output', '-'])
    model = _build(spec).to(device)
    with torch.no_grad():
        embed_dim = model.eval()(torch.zeros(2, 3, 112, 112, device=device)).shape[-1]
    net = FaceTrainModel(model.train(), MarginHead(embed_dim, num_classes, kind=flags.loss, s=flags.scale,
                                                   m=flags.margin)).to(device)
    opt = build_optimizer(net, flags, fused=device.type == 'cuda')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, 112, 112, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)

    def step():
        loss = net(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return step


def _rss_mb(field: str) -> Optional[float]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _memory_worker(spec, batch_size: int, num_classes: int, steps: int, queue) -> None:
    step = _step_fn(spec, batch_size, num_classes, torch.device('cpu'))
    step()  # the first step allocates gradients and optimizer buffers: part of what training holds
    try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so the peak below is the steps' own
        Path('/proc/self/clear_refs').write_text('5')
    except OSError:
        queue.put(None)
        return
    before = _rss_mb('VmRSS')
    for _ in range(steps):
        step()
    peak = _rss_mb('VmHWM')
    queue.put(None if before is None or peak is None else peak - before)


def step_memory_mb(spec, batch_size: int, num_classes: int, device: torch.device, steps: int = 2) -> Optional[float]:
    """Peak memory of a training step above the steady state (weights, gradients, optimizer buffers): CUDA peak
    allocated, or on CPU the peak RSS above the RSS between steps, in a fresh process (None where Linux's
    /proc/self/clear_refs is not available)."""
    if device.type == 'cuda':
        step = _step_fn(spec, batch_size, num_classes, device)
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    import multiprocessing as mp
    # a fresh process per model: forked from one server that has imported train.face and computed nothing (its
    # OpenMP threads not yet started), instead of a Python + torch start per model (spawn, where there is no
    # forkserver)
    if 'forkserver' in mp.get_all_start_methods():
        ctx = mp.get_context('forkserver')
        ctx.set_forkserver_preload(['train.face', 'train.compare_measure'])
    else:
        ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(spec, batch_size, num_classes, steps, queue))
    proc.start()
    value = queue.get(timeout=1800)
    proc.join()
    return None if value is None else round(float(value), 1)


def training_cost(specs, batch_size: int, num_classes: int, device: torch.device, steps: int) -> List[Dict]:
    """Params, MACs, step time (the project's round-robin timer over the models, median) and step memory of each
    train-time model."""
    from timm_mobileone.deploy.profile import count_macs, count_params, time_round_robin
    fns = {i: _step_fn(s, batch_size, num_classes, device) for i, s in enumerate(specs)}
    for fn in fns.values():
        fn()  # warm-up (the first step allocates the optimizer state)
    medians = time_round_robin(fns, steps)
    out = []
    for i, spec in enumerate(specs):
        model = _build(spec)
        out.append(dict(params_m=round(count_params(model) / 1e6, 3), gmacs=round(count_macs(model) / 1e9, 3),
                        step_s=round(medians[i], 4), batch_size=batch_size,
                        step_memory_mb=step_memory_mb(spec, batch_size, num_classes, device)))
    return out


def deploy_cost(specs, repeats: int = 20) -> List[Dict]:
    """Fused params, MACs and eager batch-1 latency (the project's round-robin timer over the models, median)."""
    from timm.utils import reparameterize_model
    from timm_mobileone.deploy.profile import count_macs, count_params, time_round_robin
    fused = [reparameterize_model(_build(s).eval()) for s in specs]
    x = torch.randn(1, 3, 112, 112)

    def call(m):
        @torch.no_grad()
        def run():
            return m(x)
        return run
    medians = time_round_robin({i: call(m) for i, m in enumerate(fused)}, repeats)
    return [dict(params_m=round(count_params(m) / 1e6, 3), gmacs=round(count_macs(m) / 1e9, 3),
                 latency_ms=round(medians[i] * 1e3, 3)) for i, m in enumerate(fused)]


def _kurtosis(w: np.ndarray) -> float:
    w = w.astype(np.float64).ravel()
    var = w.var()
    return float(((w - w.mean()) ** 4).mean() / var ** 2 - 3.0) if var > 0 else 0.0


def weight_stats(fused: torch.nn.Module) -> Dict[str, Any]:
    """Per fused conv / linear layer: per-output-channel range spread (max / median channel range) and excess
    kurtosis of the weights; with the median and maximum over layers."""
    layers = []
    for name, m in fused.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.dim() >= 2:
            w = m.weight.detach().cpu().numpy().reshape(m.weight.shape[0], -1)
            ranges = w.max(axis=1) - w.min(axis=1)
            med = float(np.median(ranges))
            layers.append(dict(layer=name, channels=int(w.shape[0]),
                               range_spread=round(float(ranges.max() / med), 3) if med > 0 else None,
                               kurtosis=round(_kurtosis(w), 3)))
    spreads = [x['range_spread'] for x in layers if x['range_spread'] is not None]
    kurt = [x['kurtosis'] for x in layers]
    return dict(range_spread_median=round(float(np.median(spreads)), 3), range_spread_max=round(max(spreads), 3),
                kurtosis_median=round(float(np.median(kurt)), 3), kurtosis_max=round(max(kurt), 3), layers=layers)


def teacher_agreement(runs: List[Dict[str, Any]], specs, labels: List[str], val: Sequence[str],
                      device: str) -> None:
    """Students of one teacher (train.face --teacher): how closely each run's best weights reproduce the teacher's
    embedding on the validation crops (people the runs never trained on). Per image, the cosine between the
    student's and the teacher's flip-summed embeddings; `run['teacher_agreement']` gets its mean and 5th
    percentile. A finer measure of what distillation learned than pair accuracy on a few hundred pairs."""
    from eval.api import EmbedOptions, Embedder, ModelSpec, combine_views, embed, load_model
    from timm_mobileone.verification_data import load_verification_set
    from .distill import build_teacher
    cfg = runs[0]['config']
    targs = argparse.Namespace(teacher=cfg['teacher'], teacher_checkpoint=cfg.get('teacher_checkpoint', ''),
                               teacher_onnx=cfg.get('teacher_onnx', ''),
                               teacher_raw_pixels=cfg.get('teacher_raw_pixels', False), val_batch_size=64,
                               workers=0, device=device)
    teacher = build_teacher(targs, (112, 112))
    options = EmbedOptions(batch_size=64, workers=0, flip=True)

    def unit(embedder, dataset):  # eval's flip rule: image + flip summed, then normalized
        raw, flip, _ = embed(embedder, dataset, options)
        return combine_views(raw, flip)

    sets = [load_verification_set(p) for p in val]
    reference = [unit(Embedder(teacher.eval_args, teacher.model, teacher.cfg), d) for d in sets]
    for run in runs:
        if run['diverged'] or not run['weights']:
            continue
        name = specs[labels.index(run['model'])][0]
        student = load_model(ModelSpec(model=name, checkpoint=run['weights'], device=device))
        cos = np.concatenate([np.sum(unit(student, d) * t, axis=1) for d, t in zip(sets, reference)])
        run['teacher_agreement'] = dict(cosine_mean=round(float(cos.mean()), 4),
                                        cosine_p05=round(float(np.percentile(cos, 5)), 4), images=len(cos))


def int8_check(run: Dict[str, Any], spec, val: Sequence[str], calib: np.ndarray, heldout: np.ndarray,
               folder: Path) -> Dict[str, Any]:
    """FP32 and INT8 ONNX of the run's best weights: verification accuracy of each, embedding cosine, weights."""
    from timm.utils import reparameterize_model
    from eval.api import ArtifactModel, verify, wrap_model
    from timm_mobileone.deploy import formats
    from timm_mobileone.verification_data import load_verification_set
    fused = reparameterize_model(_build(spec, run['weights']).eval())
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = folder / 'fp32.onnx', folder / 'int8.onnx'
    formats.export_onnx(fused, str(fp32_path))
    q = formats.onnx_int8_beside(fp32_path, int8_path, calib, heldout)
    sets = [load_verification_set(p) for p in val]
    acc = {}
    for label, path in (('fp32', fp32_path), ('int8', int8_path)):
        res = verify(wrap_model(ArtifactModel('onnx', str(path), dict(fused.pretrained_cfg))), sets)
        acc[label] = {r['dataset']: r['accuracy'] for r in res.results}
    return dict(accuracy_fp32=acc['fp32'], accuracy_int8=acc['int8'], reduce_range=q['reduce_range'],
                cosine_mean=round(q['cosine_mean'], 5), cosine_min=round(q['cosine_min'], 5),
                weights=weight_stats(fused))
