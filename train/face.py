"""Face-recognition training: from a dataset to a Hub folder, `python -m train.face`.

    python -m train.face --model mobileone_112_s0 --data ms1m-retinaface-t1/ --loss arcface --epochs 20 \
        --batch-size 128 --lr 0.1 --output runs/s0 --val lfw.bin cfp_fp.bin agedb_30.bin
    torchrun --nproc-per-node=8 -m train.face ...                 # DistributedDataParallel, one process per GPU
    python -m train.face ... --output runs/s0 --resume            # continue from runs/s0/last.json

Data: an insightface RecordIO pack (a folder with `train.rec` + `train.idx`, or the `.rec` file) read without mxnet,
or an ImageFolder tree (one folder per identity). Images must be aligned crops of the model's input size.
Recipe: margin head (ArcFace s=64 m=0.5, CosFace s=64 m=0.4 or AdaFace s=64 m=0.4 h=0.333; `--sample-rate` for
partial FC) on the model's embedding, replicated on every process or, by default with several processes, sharded
across them (`--head sharded`: each process holds C/W class centres, train/partial_fc.py); SGD with momentum 0.9 (or
AdamW); linear warmup then cosine or polynomial decay of the learning rate (timm's schedulers, updated every step);
weight decay annealed by cosine from `--weight-decay` to `--weight-decay-end` (the MobileOne paper's schedule), none
on norm and bias parameters; optional EMA of the weights; AMP on GPUs; gradient clipping. `--batch-size` and `--lr`
are per process and global as given: with N processes the global batch is N x batch-size, and the learning rate is
not rescaled.

Validation runs on a reparameterized (fused) copy with eval.verify's protocol and code, every `--val-every` steps
and at the end; the best mean accuracy keeps `best.safetensors` (train-time state dict) and `best.json` (the
eval.verify result, whose `command` reproduces it). At the end the best checkpoint goes through
`timm_mobileone.hub export` into `OUTPUT/hub`, ready for `python -m timm_mobileone.hub push`.

Checkpoints: `checkpoint-<step>.safetensors` (model, margin head, EMA, optimizer buffers, RNG states; with a sharded
head, each process's centres and their optimizer buffers in `checkpoint-<step>.head-<rank>.safetensors`) and
`last.json` (step, schedule, optimizer hyperparameters, scaler, best so far, the run's flags), which names the
weights file and is written last, atomically: a crash at any moment leaves `last.json` pointing at a complete
checkpoint, and loses only the steps since. Logs: one line per `--log-interval` steps on stderr and in
`OUTPUT/log.jsonl`; stdout carries one JSON summary. User mistakes: one `error:` line, exit code 2.
"""
import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError
from timm_mobileone.models.merged import TRAIN_FORMS

from . import augment, distill, margin
from .checkpoint import STATE_NAME
from .distributed import World
from .loop import Trainer

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog='python -m train.face', description=__doc__.splitlines()[0],
                                formatter_class=fmt)
    p.add_argument('-m', '--model', default='mobileone_112_s0', help='mobileone_112_s0 ... s4 (or another timm '
                   'model returning embeddings)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra timm.create_model arguments, e.g. head_type=conv1x1 head_chs=32 (timm train.py\'s '
                        'flag; values read as Python literals, else strings)')
    p.add_argument('--pretrained', action='store_true', help='start from the pretrained weights of --model')
    p.add_argument('--initial-checkpoint', default='', help='start from this state dict')
    p.add_argument('--data', required=True, help='a folder with train.rec + train.idx (insightface RecordIO), a '
                   '.rec file, or an ImageFolder tree (one folder per identity)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='identities (default: the pack\'s property file or header, or the ImageFolder\'s folders)')
    p.add_argument('--loss', default='arcface', choices=(*margin.KINDS, 'none'),
                   help='margin loss (none: distillation only, with --teacher)')
    p.add_argument('--margin', type=float, default=None,
                   help='margin m (default: ' + ', '.join(f'{v} {k}' for k, v in margin.DEFAULT_MARGIN.items()) + ')')
    p.add_argument('--scale', type=float, default=64.0, help='logit scale s')
    p.add_argument('--adaface-h', type=float, default=0.333, help='AdaFace: h, the spread of the norm-adaptive margin')
    p.add_argument('--adaface-t-alpha', type=float, default=0.01,
                   help='AdaFace: EMA rate of the feature-norm batch mean and std')
    p.add_argument('--head', default=None, choices=('replicated', 'sharded'),
                   help='margin head: every class centre on every process (replicated), or each process holding '
                        'C/W of them (sharded, Partial FC; the default with more than one process)')
    p.add_argument('--sample-rate', type=float, default=1.0,
                   help='partial FC: fraction of class centres scored per step (batch classes always included; '
                        'with --head sharded, of each process\'s own centres)')
    p.add_argument('--epochs', type=int, default=20, help='epochs')
    p.add_argument('-b', '--batch-size', type=int, default=128, help='images per step and process')
    p.add_argument('--opt', default='sgd', choices=('sgd', 'adamw'), help='optimizer (sgd: momentum, no nesterov)')
    p.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    p.add_argument('--lr', type=float, default=0.1, help='peak learning rate')
    p.add_argument('--sched', default='cosine', choices=('cosine', 'poly'), help='learning-rate decay after warmup')
    p.add_argument('--poly-power', type=float, default=2.0, help='power of the poly schedule')
    p.add_argument('--min-lr', type=float, default=0.0, help='learning rate at the end of training')
    p.add_argument('--warmup-epochs', type=float, default=1.0, help='linear warmup length (may be fractional)')
    p.add_argument('--warmup-lr', type=float, default=0.0, help='learning rate at step 0 of the warmup')
    p.add_argument('--weight-decay', type=float, default=1e-4, help='weight decay at step 0 (not on norm/bias)')
    p.add_argument('--weight-decay-end', type=float, default=1e-5, help='weight decay at the end (cosine anneal)')
    p.add_argument('--clip-grad', type=float, default=None, help='clip the gradient norm to this value')
    p.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (validated and exported)')
    p.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay per step')
    p.add_argument('--model-ema-warmup', action='store_true',
                   help='ramp the EMA decay up from 0 as 1 - (1 + step)^(-2/3), capped at --model-ema-decay '
                        '(timm train.py\'s flag); without it a short run\'s EMA is mostly its first step\'s '
                        'weights, near the random init (74%% of them after 300 steps at 0.999)')
    p.add_argument('--drop-path', type=float, default=0.0, help='drop path rate')
    p.add_argument('--amp', action='store_true', help='mixed precision (CUDA: float16 with a grad scaler, or '
                   '--amp-dtype bfloat16; CPU: bfloat16)')
    p.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype on CUDA')
    p.add_argument('--channels-last', action='store_true',
                   help='channels_last memory format (CUDA only: on CPU, oneDNN#6035 breaks its backward)')
    p.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in backward')
    p.add_argument('--train-form', default='branches', choices=TRAIN_FORMS,
                   help='how MobileOne blocks train: every branch as a module, or the same function as one conv '
                        'per block (timm_mobileone.models.merged: exact, same weights and checkpoints, faster)')
    p.add_argument('--compile', action='store_true', help='torch.compile the model and loss (checkpoints are '
                   'the uncompiled model\'s)')
    p.add_argument('--compile-backend', default='inductor', help='torch.compile backend (timm train.py\'s '
                   '--torchcompile value; eager: dynamo tracing alone)')
    p.add_argument('--sync-bn', action='store_true', help='synchronize BatchNorm statistics across processes')
    p.add_argument('--val', nargs='+', default=[], metavar='PACK',
                   help='verification packs (.bin) or aligned folders with pairs.txt for validation')
    p.add_argument('--best-on', default='', metavar='NAME',
                   help='the --val set that chooses the best weights (its name: the pack\'s file stem or the '
                        'folder\'s name); the others are logged as curves only (default: the mean over all)')
    p.add_argument('--val-every', type=int, default=0, help='validate every N steps (0: at each epoch end)')
    p.add_argument('--val-batch-size', type=int, default=128, help='validation batch size')
    p.add_argument('--checkpoint-every', type=int, default=0, help='checkpoint every N steps (0: each epoch end)')
    p.add_argument('--output', required=True, help='run folder (checkpoints, logs, best weights, hub export)')
    p.add_argument('--resume', action='store_true', help='continue the run in --output from its last checkpoint')
    p.add_argument('--tag', default='', help='pretrained tag of the exported weights (default: <data>_<loss>)')
    p.add_argument('--no-export', dest='export', action='store_false', help='skip the hub export at the end')
    p.add_argument('--preload', action='store_true',
                   help='decode every training image once and keep the uint8 crops on the device (37 KB each); '
                        'steps read no files. The same batches as without it')
    p.add_argument('-j', '--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader processes decoding images per training process')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--seed', type=int, default=42, help='random seed')
    p.add_argument('--log-interval', type=int, default=50, help='log every N steps')
    p.add_argument('--license', default=None, help='licence of the exported weights (the model card\'s; default '
                   'apache-2.0, or other with --teacher: weights distilled from a teacher carry its terms, e.g. '
                   'insightface\'s non-commercial research licence)')
    distill.add_flags(p)
    augment.add_flags(p)
    args = p.parse_args(argv)  # unparseable values: argparse's usage and error (exit code 2)
    args.command = f"{p.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    check_flags(args)
    return args


def check_flags(args: argparse.Namespace) -> None:
    """Impossible values and combinations of parsed flags: UserError (one `error:` line, exit code 2, no usage
    block), before anything is built or the run folder exists."""
    import math
    try:
        args.model_kwargs = parse_kwargs(args.model_kwargs)
    except ValueError as e:
        raise UserError(f'--model-kwargs: {e}') from None
    for name in ('epochs', 'batch_size', 'log_interval', 'val_batch_size'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name.replace("_", "-")} must be >= 1')
    for name in ('workers', 'val_every', 'checkpoint_every'):
        if getattr(args, name) < 0:
            raise UserError(f'--{name.replace("_", "-")} must be >= 0')
    for name in ('lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'weight_decay', 'weight_decay_end', 'momentum',
                 'drop_path', 'scale', 'adaface_h', 'poly_power'):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):  # the optimizer raises a traceback on some, NaN on others
            raise UserError(f'--{name.replace("_", "-")} must be a finite number >= 0 (got {value:g})')
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin >= 0):
        raise UserError(f'--margin must be a finite number >= 0 (got {args.margin:g})')
    if not args.scale > 0:
        raise UserError('--scale must be > 0 (the logit scale s)')
    if not args.drop_path < 1:
        raise UserError('--drop-path must be in [0, 1)')
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        raise UserError(f'--clip-grad must be a finite number > 0 (got {args.clip_grad:g})')
    if not 0.0 <= args.model_ema_decay <= 1.0:
        raise UserError('--model-ema-decay must be in [0, 1]')
    if not 0.0 < args.sample_rate <= 1.0:
        raise UserError('--sample-rate must be in (0, 1]')
    if not 0.0 <= args.adaface_t_alpha <= 1.0:
        raise UserError('--adaface-t-alpha must be in [0, 1]')
    if args.num_classes is not None and args.num_classes < 2:
        raise UserError('--num-classes must be >= 2')
    if args.best_on and not args.val:
        raise UserError(f'--best-on {args.best_on}: names a --val set, and no --val is given')
    augment.check_flags(args)
    distill.check_flags(args)
    if args.license is None:
        args.license = 'other' if args.teacher else 'apache-2.0'
    if args.tag and not re.fullmatch(r'[a-z0-9][a-z0-9_]*', args.tag):
        raise UserError('--tag: use lowercase letters, digits and _ (e.g. ms1mv3_arcface)')


def parse_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """['head_type=conv1x1', 'head_chs=32'] -> {'head_type': 'conv1x1', 'head_chs': 32}, as timm's ParseKwargs
    reads them (Python literals, else strings), but a malformed item raises ValueError instead of a traceback."""
    import ast
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'{item!r} is not KEY=VALUE')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


@cli(log_level=logging.INFO, log_format='%(asctime)s %(name)s: %(message)s')
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run a training job; returns (and prints) the JSON summary."""
    args = parse_args(argv)
    # timm's "Loaded  from checkpoint" INFO line (the teacher's, --initial-checkpoint's) says what the command line
    # says; a refusal that follows it must stay the one line on stderr
    logging.getLogger('timm.models._helpers').setLevel(logging.WARNING)
    world = trainer = None
    try:
        world = World(args.device)
        if not world.main:
            logging.getLogger().setLevel(logging.WARNING)
        trainer = Trainer(args, world)
        summary = trainer.fit()
    except KeyboardInterrupt:
        if trainer is not None:
            trainer.discard_empty_output()
        if not (Path(args.output) / STATE_NAME).is_file():
            raise KeyboardInterrupt('interrupted before the first checkpoint: nothing to resume') from None
        raise KeyboardInterrupt(f'interrupted; resume with --resume (the last checkpoint in {args.output})') from None
    except UserError:  # a refusal or a bad image in the first batches: no empty run folder is left behind
        if trainer is not None:
            trainer.discard_empty_output()
        raise
    finally:
        if world is not None:
            world.close()
    if world.main:
        print(json.dumps(summary))
    return summary


if __name__ == '__main__':
    main()
