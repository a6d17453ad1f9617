"""Which block (or head) is better: train two or more architectures alike and compare them, `python -m
train.compare_blocks`.

    python -m train.compare_blocks --models mobileone_112_s0 mobileone_112_dbb_s0 --data DATA --val lfw.bin \
        --output OUT [--seeds 1 2 3] [--lr 0.1 0.05] [train.face flags: --epochs --batch-size --loss ...]
    python -m train.compare_blocks --models mobileone_112_s0 mobileone_112_s0:head_type=conv1x1 ...   # heads
    python -m train.compare_blocks --runs OUT/mobileone_112_s0-seed1 OUT/mobileone_112_dbb_s0-seed1 --output OUT
    python -m train.compare_blocks --models mobileone_112_s0:embed_dim=128 mobileone_112_dbb_s0:embed_dim=128 \
        --data SPLIT/train --val SPLIT/val --output OUT --loss none --teacher mobilefacenet \
        --teacher-checkpoint model-0000.params --amp                   # students of one teacher, on real faces

Each model is trained by `train.face` once per seed and learning rate, with the same data, data order (the seed
fixes the sampler and flips), recipe, teacher (with `--teacher`: train/distill.py; the runs share one cache of its
targets, `OUT/teacher.safetensors`, unless `--teacher-cache` says otherwise) and validation packs
(`OUT/<model>-seed<S>[-lr<LR>]`; a finished run folder is reused, an interrupted one resumed), or finished run
folders are read (`--runs`). A model is a registered name,
optionally with `create_model` arguments: `NAME:key=value,key=value`. The report compares, side by side:

* cost of training: train-time params and MACs, step time (forward + backward + SGD step of backbone and margin
  head, the same batch, median, timed round-robin over the models by `profile.time_round_robin`) and peak memory
  of a step (CUDA: peak allocated; CPU: growth of the peak RSS over the steps, in a fresh process per model);
* trainability: loss curves, gradient-norm statistics, runs that diverged (non-finite loss) or blew up (a logged loss
  above 3x the first) per seed and learning rate;
* accuracy: each validation pack, best and final, mean and spread (std, ddof=0) over seeds;
* quantization friendliness: the project's INT8 post-training quantization (ONNX QDQ, `timm_mobileone.export`) of
  each run's best weights, calibrated on the same images; verification accuracy of the FP32 and INT8 ONNX models
  and their embedding cosine on held-out crops; the fused weights' per-output-channel range spread (largest channel
  range / median channel range: what a per-tensor scale loses) and excess kurtosis, layer by layer;
* deploy cost: fused params, MACs and batch-1 latency (equal by construction for MobileOne vs DBB; measured).

Writes `OUT/compare.json` (the stdout object), `OUT/compare.md` (the tables) and `OUT/compare.png` (loss and
validation accuracy curves). User mistakes: one `error:` line, exit code 2, nothing written.
"""
import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from timm_mobileone.cli import cli
from timm_mobileone.errors import UserError
from timm_mobileone.files import atomic_write

from .compare_measure import _build, deploy_cost, int8_check, teacher_agreement, training_cost
from .compare_report import accuracies, markdown, plot, summarize_models, trainability
from .compare_runs import VARIED, check_same_recipe, parse_spec, read_run, spec_label, train_runs

_logger = logging.getLogger('train.compare_blocks')


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog='python -m train.compare_blocks', description=__doc__.splitlines()[0],
                                formatter_class=fmt, epilog='Other flags are passed to train.face unchanged.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--models', nargs='+', metavar='NAME[:K=V,...]',
                     help='architectures to train and compare (at least 2)')
    src.add_argument('--runs', nargs='+', metavar='DIR', help='finished train.face run folders to compare')
    p.add_argument('--data', default='', help='training data (train.face --data); with --models')
    p.add_argument('--val', nargs='+', default=[], metavar='PACK',
                   help='validation packs (train.face --val; with --runs: default the packs the runs validated on)')
    p.add_argument('--output', required=True, help='folder of the runs and the report')
    p.add_argument('--seeds', nargs='+', type=int, default=[1], help='seeds; every model trains once per seed')
    p.add_argument('--lr', nargs='+', type=float, default=[0.1], help='learning rates; every model, every seed')
    p.add_argument('-b', '--batch-size', type=int, default=128, help='train.face --batch-size; also the batch of '
                   'the step time / memory measurement')
    p.add_argument('--calib', default='', help='INT8 calibration crops (folder or pack; default: the first --val)')
    p.add_argument('--calib-images', type=int, default=64, help='INT8 calibration images')
    p.add_argument('--heldout-images', type=int, default=32, help='held-out images for the INT8 vs FP32 cosine')
    p.add_argument('--no-int8', dest='int8', action='store_false', help='skip the INT8 comparison')
    p.add_argument('--no-cost', dest='cost', action='store_false',
                   help='skip the training / deployment cost tables (e.g. for runs trained on another machine)')
    p.add_argument('--cost-steps', type=int, default=5, help='timed training steps per model for the cost table')
    p.add_argument('--cost-batch-size', type=int, default=None,
                   help='batch of the step time / memory measurement (default: --batch-size)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    p.add_argument('--no-plot', dest='plot', action='store_false', help='skip compare.png')
    args, extra = p.parse_known_args(argv)
    args.command = f"{p.prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    reserved = {'--model', '-m', '--output', '--seed', '--resume', '--data', '--val', '--model-kwargs'}
    clash = [a for a in extra if a.split('=')[0] in reserved]
    if clash:
        p.error(f'{clash[0]} is set by compare_blocks for each run')
    if args.models is not None:
        if len(args.models) < 2:
            p.error('--models: give at least 2 models to compare')
        if not args.data:
            p.error('--models needs --data')
        if not args.val:
            p.error('--models needs --val (accuracy is part of the comparison)')
    elif extra or args.data:
        p.error(f'--runs reads finished runs; training flags ({(extra or ["--data"])[0]}) are not used')
    for name in ('batch_size', 'calib_images', 'heldout_images', 'cost_steps', 'cost_batch_size'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    return args, extra


def compare(args, extra: Sequence[str]) -> Dict[str, Any]:
    out = Path(args.output)
    if args.models is not None:
        specs = [parse_spec(m) for m in args.models]
        labels = [spec_label(*s) for s in specs]
        if len(set(labels)) != len(labels):
            raise UserError('--models: the same model is named twice')
        for p in args.val:
            if not Path(p).exists():
                raise UserError(f'--val {p}: no such file or folder')
        from .face import parse_args as face_args
        face_args(['--model', specs[0][0], '--data', args.data, '--output', str(out / '_check'),
                   '-b', str(args.batch_size), *extra])  # train.face's own checks of the passed flags
        entries = train_runs(args, extra, specs)
        runs = []
        for e in entries:
            run = read_run(Path(e['folder']), require_finished=not e['diverged'])
            run.update(diverged=e['diverged'], error=e['error'])
            runs.append(run)
    else:
        runs = [read_run(Path(f)) for f in args.runs]
        for run in runs:
            run.update(diverged=False, error=None)
        labels = list(dict.fromkeys(r['model'] for r in runs))
        specs = [parse_spec(m) for m in labels]
        if len(labels) < 2:
            raise UserError('--runs: all runs are of one model; give runs of at least 2 models')
        if not args.val:  # the packs the runs validated on
            args.val = list(dict.fromkeys(x['data'] for r in runs if r['best'] for x in r['best']['results']))
    check_same_recipe(runs)
    for run in runs:
        run['trainability'] = trainability(run)
        run['accuracy'] = accuracies(run)
    num_classes = runs[0]['config'].get('num_classes') or 1000
    device = torch.device(args.device)
    train_cost = dep_cost = None
    if args.cost:
        _logger.info('measuring training and deployment cost')
        batch = args.cost_batch_size or (args.batch_size if args.models else runs[0]['config']['batch_size'])
        train_cost = training_cost(specs, batch, num_classes, device, args.cost_steps)
        dep_cost = deploy_cost(specs)
    if args.int8:
        import timm
        from timm_mobileone.export import calib_and_heldout
        cfg = timm.data.resolve_model_data_config(_build(specs[0]))
        calib_src = args.calib or (args.val[0] if args.val else '')
        if not calib_src:
            raise UserError('INT8: give --calib (no validation pack to calibrate on), or --no-int8')
        calib, heldout = calib_and_heldout(calib_src, cfg, args.calib_images, args.heldout_images)
        for run in runs:
            if run['diverged'] or not run['weights']:
                continue
            spec = specs[labels.index(run['model'])]
            _logger.info(f'INT8: {run["folder"]}')
            run['int8'] = int8_check(run, spec, args.val, calib, heldout, out / 'int8' / Path(run['folder']).name)
    if runs[0]['config'].get('teacher') and args.val:
        _logger.info('agreement of each student with the teacher')
        teacher_agreement(runs, specs, labels, args.val, args.device)
    summary = summarize_models(labels, runs)
    report = dict(
        command=args.command, output=str(out), models=labels, data=runs[0]['data'], val=list(args.val),
        recipe={k: v for k, v in runs[0]['config'].items() if k not in VARIED}, device=str(device),
        training_cost=train_cost, deploy_cost=dep_cost, summary=summary,
        runs=[dict(folder=r['folder'], model=r['model'], seed=r['config']['seed'], lr=r['config']['lr'],
                   diverged=r['diverged'], error=r['error'], accuracy=r['accuracy'],
                   trainability=r['trainability'], int8=r.get('int8'),
                   teacher_agreement=r.get('teacher_agreement')) for r in runs])
    text = json.dumps(report)
    atomic_write(out / 'compare.json', lambda f: f.write((text + '\n').encode()))
    atomic_write(out / 'compare.md', lambda f: f.write(markdown(report).encode()))
    if args.plot:
        plot(out / 'compare.png', runs, labels)
    print(text)
    return report


@cli(log_level=logging.INFO, log_format='%(asctime)s %(name)s: %(message)s')
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the comparison; returns (and prints) the JSON report."""
    args, extra = parse_args(argv)
    return compare(args, extra)


if __name__ == '__main__':
    main()
