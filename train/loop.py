"""The training loop of `train.face`: epochs over the resumable sampler, logging, validation on a fused copy,
checkpoints and resume, and the hub export at the end."""
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from timm_mobileone.errors import UserError

from . import checkpoint as ckpt
from .build import build_run, discard_empty_output, make_output
from .checkpoint import BEST_RESULT, BEST_WEIGHTS, FINAL_WEIGHTS, RUN_DEFINING
from .data import collate
from .optim import load_optimizer, optimizer_tensors
from .distributed import World
from .step import StepStats, train_step

__all__ = ['Trainer']

_logger = logging.getLogger('train')


def _default_tag(data: str, loss: str) -> str:
    p = Path(data)
    name = p.parent.name if p.suffix == '.rec' else p.name
    slug = re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'custom'
    return f'{slug}_{loss}' if slug[0].isalnum() else f'custom_{loss}'


class Trainer:
    """One training process: the run `build_run` makes from the flags (`self.run`, fixed), trained: steps,
    validation, checkpoints, resume, the export. Its own state is what moves: the step, the best validation so far,
    the step statistics on the device, the DataLoader (made at the first epoch)."""

    def __init__(self, args, world: World) -> None:
        self.run = build_run(args, world)
        self.step = 0
        self.best: Optional[Dict[str, Any]] = None
        self.stats = StepStats(world.device)
        self._data_loader = None
        self._t_start = time.perf_counter()  # the log's `seconds` are since fit() began (set again there)
        self.created_output = make_output(self.run.out, world)
        if args.resume:
            self._resume()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        """Step `self.step` (train.step.train_step on the run's parts); the seam tests interrupt a run at."""
        run = self.run
        return train_step(self.step, images, labels, run.inputs, run.model, run.optim, run.world, self.stats)

    def discard_empty_output(self) -> bool:
        """Remove the run folder if this run made it and a failure left nothing in it (e.g. a bad image in the first
        batches, before any log row or checkpoint); returns whether it did."""
        return discard_empty_output(self.run.out, self.created_output)

    # -- checkpoints

    def _run_config(self) -> Dict[str, Any]:
        run = self.run
        cfg = {k: getattr(run.args, k) for k in RUN_DEFINING if k not in ('head', 'world_size', 'num_classes')}
        return dict(cfg, head=run.model.head_kind, world_size=run.world.world_size, num_classes=run.data.num_classes)

    def save_checkpoint(self) -> None:
        run = self.run
        rng = run.world.gather(dict(cpu=torch.get_rng_state(),
                                    cuda=torch.cuda.get_rng_state() if run.device.type == 'cuda' else None))
        opt_tensors, opt_rest = optimizer_tensors(run.optim.optimizer)
        name = ckpt.checkpoint_name(self.step)
        shards: List[str] = []
        if run.model.sharded:  # every process writes its centres and their optimizer state
            head_keys = {k for k in opt_tensors if int(k.split('.')[1]) in run.optim.head_indices}
            shards = [ckpt.shard_name(self.step, r) for r in range(run.world.world_size)]
            shard = dict(ckpt.prefixed('head', run.model.head.state_dict()),
                         **{k: opt_tensors.pop(k) for k in head_keys})
            ckpt.save_safetensors(run.out / shards[run.world.rank], shard, metadata=dict(
                step=str(self.step), rank=str(run.world.rank), world_size=str(run.world.world_size),
                class_start=str(run.model.head.class_start), num_classes=str(run.model.head.num_local)))
            run.world.barrier()  # every shard is on disk before last.json names them
        if not run.world.main:
            return
        tensors = ckpt.prefixed('model', run.model.backbone.state_dict())
        if not run.model.sharded:
            tensors.update(ckpt.prefixed('head', run.model.head.state_dict()))
        if run.model.ema is not None:
            tensors.update(ckpt.prefixed('ema', run.model.ema.module.state_dict()))
        tensors.update(opt_tensors)
        for r, state in enumerate(rng):
            tensors[f'rng.cpu.{r}'] = state['cpu']
            if state['cuda'] is not None:
                tensors[f'rng.cuda.{r}'] = state['cuda']
        ckpt.save_safetensors(run.out / name, tensors, metadata=dict(step=str(self.step)))
        state = dict(
            step=self.step, epoch=self.step // run.data.steps_per_epoch, total_steps=run.optim.total_steps,
            steps_per_epoch=run.data.steps_per_epoch, checkpoint=name, head_shards=shards, run=self._run_config(),
            lr_scheduler=run.optim.lr_scheduler.state_dict(), optimizer=opt_rest,
            scaler=run.optim.scaler.state_dict() if run.optim.scaler is not None else None,
            best=self.best, command=run.args.command, data=run.args.data, time=time.time())
        ckpt.commit(run.out, state, keep=[name, *shards])  # last.json names a complete checkpoint
        _logger.info(f'step {self.step}: checkpoint {run.out / name}')

    def _resume(self) -> None:
        run = self.run
        state, tensors = ckpt.read(run.out)
        ckpt.check_run_flags(run.out, state['run'], self._run_config())
        if run.model.sharded:
            tensors.update(ckpt.read_shard(run.out, state, run.world.rank))
        run.model.backbone.load_state_dict(ckpt.strip('model', tensors))
        run.model.head.load_state_dict(ckpt.strip('head', tensors))
        if run.model.ema is not None:
            run.model.ema.module.load_state_dict(ckpt.strip('ema', tensors))
        load_optimizer(run.optim.optimizer, tensors, state['optimizer'])
        run.optim.lr_scheduler.load_state_dict(state['lr_scheduler'])
        if run.optim.scaler is not None and state.get('scaler'):
            run.optim.scaler.load_state_dict(state['scaler'])
        torch.set_rng_state(tensors[f'rng.cpu.{run.world.rank}'])
        if run.device.type == 'cuda' and f'rng.cuda.{run.world.rank}' in tensors:
            torch.cuda.set_rng_state(tensors[f'rng.cuda.{run.world.rank}'])
        self.step = state['step']
        self.best = state.get('best')
        if run.world.main:
            ckpt.truncate_log(run.out, self.step)
        _logger.info(f'resumed {run.out} at step {self.step}/{run.optim.total_steps}')

    def _log(self, row: Dict[str, Any]) -> None:
        if self.run.world.main:
            ckpt.append_log(self.run.out, row)

    # -- validation

    def fused_copy(self) -> nn.Module:
        """The validated weights in a fresh model of the architecture, reparameterized, on the device.

        A fresh model rather than a deep copy: the copy must be exactly what `best.safetensors` loads into (the
        eval command in best.json), and SyncBatchNorm modules are not the BatchNorm2d timm's fusion expects.
        """
        import timm
        from timm.utils import reparameterize_model
        run = self.run
        model = timm.create_model(run.arch, num_classes=0, **run.args.model_kwargs)
        model.load_state_dict(run.model.eval_model().state_dict())
        model = reparameterize_model(model.eval(), inplace=True)
        return model.to(run.device, memory_format=torch.channels_last)

    def validate(self) -> Optional[Dict[str, Any]]:
        """eval.verify's protocol (a library call) on a fused copy of the (EMA) weights; keeps the best. Main
        process only. best.json's `command` reproduces the figure from best.safetensors."""
        from eval.api import EmbedOptions, verify, verify_command, wrap_model
        run = self.run
        if not run.data.val_sets:
            return None
        model = run.model.eval_model()
        result = verify(wrap_model(self.fused_copy(), device=run.device), run.data.val_sets,
                        EmbedOptions(batch_size=run.args.val_batch_size)).to_json()
        result.update(verify_command(run.arch, str(run.out / BEST_WEIGHTS), run.args.val,
                                     run.args.val_batch_size), model=run.arch,
                      checkpoint=str(run.out / BEST_WEIGHTS))
        accs = {r['dataset']: r['accuracy'] for r in result['results']}
        # --best-on: one set chooses (the others are curves to read, not to select on); else the mean
        score = accs[run.args.best_on] if run.args.best_on else result['mean_accuracy']
        is_best = self.best is None or score > self.best.get('score', self.best['mean_accuracy'])
        self._log(dict(step=self.step, val=accs, mean_accuracy=result['mean_accuracy'], score=score, best=is_best,
                       seconds=round(time.perf_counter() - self._t_start, 2)))
        chosen = f' (best on {run.args.best_on})' if run.args.best_on else ' (best)'
        _logger.info(f'step {self.step}: validation {json.dumps(accs)} mean {result["mean_accuracy"]:.5f}'
                     f'{chosen if is_best else ""}')
        if is_best:
            ckpt.save_safetensors(run.out / BEST_WEIGHTS, model.state_dict(), metadata=dict(step=str(self.step)))
            ckpt.json_write(run.out / BEST_RESULT, dict(result, step=self.step))
            self.best = dict(step=self.step, mean_accuracy=result['mean_accuracy'], score=score,
                             best_on=run.args.best_on or 'mean')
        return result

    # -- training

    def _loader(self, epoch: int, start: int):
        """The run's one DataLoader, at this epoch's batches. Its workers persist across epochs: the sampler
        hands them (epoch, index) keys, so no epoch state lives in a worker's copy of the dataset."""
        run = self.run
        run.data.sampler.set_epoch(epoch, start * run.args.batch_size)
        run.data.dataset.set_epoch(epoch)
        if run.data.preloaded is not None:
            return run.data.preloaded.batches(run.data.sampler, run.args.batch_size)
        if self._data_loader is None:
            gen = torch.Generator().manual_seed(run.args.seed)  # worker seeds: not from the global RNG
            self._data_loader = torch.utils.data.DataLoader(
                run.data.dataset, batch_size=run.args.batch_size, sampler=run.data.sampler,
                num_workers=run.args.workers, collate_fn=collate, pin_memory=run.device.type == 'cuda',
                drop_last=True, generator=gen, persistent_workers=run.args.workers > 0,
                prefetch_factor=4 if run.args.workers > 0 else None)
        return self._data_loader

    def check_finite(self) -> None:
        """Raise (and record in the run's log) if a loss since the last read was not finite: at every log
        interval, and before a checkpoint or a validation could keep the diverged weights."""
        bad = self.stats.first_bad()
        if bad is None:
            return
        step, loss = bad  # step: 1-based, as log rows count
        # recorded in the run's log (train.compare_blocks counts diverged runs from it), then reported
        self._log(dict(step=step, diverged=True, loss=str(loss)))
        raise UserError(f'loss is {loss} at step {step - 1} (seen at step {self.step}); lower --lr or add '
                        f'--clip-grad (the last checkpoint, step {ckpt.last_step(self.run.out)}, is kept for --resume)')

    def fit(self) -> Dict[str, Any]:
        run, args, t_start = self.run, self.run.args, time.perf_counter()
        self._t_start = t_start  # the log's `seconds`: since this process started fitting (a resume restarts it)
        val_every = args.val_every or run.data.steps_per_epoch
        ckpt_every = args.checkpoint_every or run.data.steps_per_epoch
        first_loss = last_loss = None
        t_log, seen = time.perf_counter(), 0
        run.model.net.train()
        while self.step < run.optim.total_steps:
            epoch, start = divmod(self.step, run.data.steps_per_epoch)
            for images, labels, errors in self._loader(epoch, start):
                if errors:
                    raise UserError(errors[0])
                stats = self.train_step(images, labels)
                self.step += 1
                seen += len(images) * run.world.world_size
                if first_loss is None:
                    first_loss = stats['loss'].item()
                if self.step % args.log_interval == 0 or self.step == run.optim.total_steps:
                    self.check_finite()
                    read = self.stats.read()
                    loss = run.world.mean(read['last_loss'])
                    last_loss = loss
                    elapsed = time.perf_counter() - t_log
                    row = dict(step=self.step, epoch=self.step / run.data.steps_per_epoch, loss=loss,
                               lr=stats['lr'], weight_decay=stats['weight_decay'], grad_norm=read['grad_norm'],
                               mean_loss=run.world.mean(read['loss']), images_per_second=seen / max(elapsed, 1e-9),
                               seconds=round(time.perf_counter() - t_start, 2))
                    self._log(row)
                    _logger.info(f"step {self.step}/{run.optim.total_steps} epoch {row['epoch']:.2f} "
                                 f"loss {loss:.4f} lr {stats['lr']:.3g} wd {stats['weight_decay']:.3g} "
                                 f"{row['images_per_second']:.1f} img/s")
                    t_log, seen = time.perf_counter(), 0
                if self.step % val_every == 0 or self.step == run.optim.total_steps:
                    self.check_finite()
                    t_val = time.perf_counter()
                    if run.world.main:
                        self.validate()
                    run.world.barrier()
                    # images/s counts training only: the interval's clock skips the validation (its images since
                    # the last log row stay counted, over the training time they took)
                    t_log += time.perf_counter() - t_val
                if self.step % ckpt_every == 0 or self.step == run.optim.total_steps:
                    self.check_finite()
                    self.save_checkpoint()
                    run.world.barrier()
                if self.step >= run.optim.total_steps:
                    break
        if run.world.main:  # the final weights beside the best ones (a long run's end need not be its best)
            ckpt.save_safetensors(run.out / FINAL_WEIGHTS, run.model.eval_model().state_dict(),
                                  metadata=dict(step=str(self.step)))
        summary = dict(
            model=args.model, data=args.data, num_images=len(run.data.dataset), num_classes=run.data.num_classes,
            world_size=run.world.world_size, head={k: v for k, v in run.head_memory.items() if k != 'line'},
            steps=self.step, total_steps=run.optim.total_steps, epochs=args.epochs,
            first_loss=first_loss, last_loss=last_loss, best=self.best, output=str(run.out),
            peak_memory_mb=self._peak_memory_mb(), teacher=run.teacher_info, train_form=args.train_form,
            compile=args.compile,
            augment=run.inputs.augment.cfg.to_dict() if run.inputs.augment is not None else None,
            extra_data=list(args.extra_data), val_curve=ckpt.val_curve(run.out) if run.world.main else [],
            final_weights=str(run.out / FINAL_WEIGHTS),
            seconds=round(time.perf_counter() - t_start, 3), command=args.command)
        if run.world.main:
            summary['export'] = self.export() if args.export else None
        return summary

    def _peak_memory_mb(self) -> float:
        """Peak memory of this process: allocated on the GPU (torch's allocator), or the peak RSS on CPU."""
        device = self.run.device
        if device.type == 'cuda':
            return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        import resource
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    def _augment_words(self) -> str:
        cfg = self.run.inputs.augment.cfg
        words = [f'crops of {cfg.crop_scale[0]:g}-{cfg.crop_scale[1]:g} of the area'] if cfg.geometric else []
        words += [f'{name} {value:g}' for name, value in (('rotation up to', cfg.rotate), ('colour jitter',
                  cfg.color_jitter), ('blur p', cfg.gaussian_blur_prob), ('grayscale p', cfg.grayscale_prob),
                  ('mixup alpha', cfg.mixup), ('cutmix alpha', cfg.cutmix)) if value]
        return ', '.join(words)

    def export(self) -> Dict[str, Any]:
        """The best weights (or the final ones without --val) through timm_mobileone.hub export into OUTPUT/hub."""
        from timm_mobileone.hub import export
        run = self.run
        best = run.out / BEST_WEIGHTS
        results: Sequence[str] = [str(run.out / BEST_RESULT)] if (run.out / BEST_RESULT).is_file() else []
        if not results:
            ckpt.save_safetensors(best, run.model.eval_model().state_dict(), metadata=dict(step=str(self.step)))
        args = run.args
        loss = 'distill' if args.teacher and args.loss == 'none' else args.loss
        tag = args.tag or _default_tag(args.data, loss)
        how = (f'{args.loss} + ' if args.teacher and args.loss != 'none' else '') + (
            f'embedding distillation from the teacher `{args.teacher}` (weights: '
            f'`{args.teacher_checkpoint or args.teacher_onnx or "pretrained"}`; the teacher\'s licence terms carry '
            f'over to these weights)' if args.teacher else args.loss)
        extra = (f' plus {", ".join(f"`{d}`" for d in args.extra_data)} (unlabeled faces)' if args.extra_data
                 else '')
        seen = ''
        if run.inputs.augment is not None:
            seen = (f'the teacher online on the same augmented batch as the student ({self._augment_words()})'
                    if args.teacher else f'augmented on the device ({self._augment_words()})')
        train_data = (f'`{args.data}`{extra}: {len(run.data.dataset)} images, {run.data.num_classes} identities in '
                      f'`{args.data}`; {how}{"; " + seen if seen else ""}, {args.epochs} '
                      f'epoch{"s" if args.epochs != 1 else ""}, trained with `{args.command}`')
        try:
            return export(run.arch, str(best), tag, str(run.out / 'hub'), results=results,
                          train_data=train_data, license=args.license)
        except UserError as e:
            raise UserError(f'export: {e}') from None
