"""ImageNet-1k top-1/top-5 for any timm model: `python -m eval.imagenet --model NAME --pretrained --data-dir DIR`.

The same data pipeline as timm's validate.py (`create_dataset`, `create_loader`, `resolve_data_config`, with the
same --img-size / --crop-pct / --interpolation overrides), so for the same model, data and preprocessing the
numbers equal validate.py's. Metrics from torchmetrics (multiclass accuracy, top-1 and top-5, micro) and the mean
cross-entropy loss. Models are reparameterized unless --no-reparam. One JSON object on stdout (model, checkpoint,
data, num_images, top1, top5, loss, img_size, crop_pct, interpolation, seconds, versions).

A model whose classifier does not match the folder's classes (a face embedding model, say) is refused unless
--class-map maps the folder's classes to its outputs.
"""
import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from timm_mobileone import results as R
from timm_mobileone.checkpoints import create_model_checked
from timm_mobileone.errors import first_line

from ._flags import DEFAULT_WORKERS, RERUN_DROP, RERUN_PATHS, UserError, cli, finish
from ._result import versions

IMG_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.JPEG')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m eval.imagenet', description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', required=True, help="timm model (registry name, 'hf-hub:', 'local-dir:')")
    parser.add_argument('--pretrained', action='store_true', help='load the pretrained weights of --model')
    parser.add_argument('--checkpoint', default='', help='load this checkpoint into the model')
    parser.add_argument('--data-dir', required=True, help='ImageFolder tree (or its parent holding --split)')
    parser.add_argument('--dataset', default='', help="timm dataset name ('' = folder/tar, 'hfds/NAME', ...)")
    parser.add_argument('--split', default='validation', help='dataset split')
    parser.add_argument('--num-classes', type=int, default=None, help='classifier size to build the model with')
    parser.add_argument('--global-pool', default=None, help="model global_pool (e.g. 'avg' for mobileone_112)")
    parser.add_argument('--class-map', default='', help='file of class folder names, one per output index')
    parser.add_argument('--img-size', type=int, default=None, help='input image size (default: from the cfg)')
    parser.add_argument('--crop-pct', type=float, default=None, help='center crop fraction (default: from the cfg)')
    parser.add_argument('--interpolation', default='', help='resize interpolation (default: from the cfg)')
    parser.add_argument('-b', '--batch-size', type=int, default=64, help='images per batch')
    parser.add_argument('-j', '--workers', type=int, default=DEFAULT_WORKERS, help='DataLoader workers')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='torch device')
    parser.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, float16 on CUDA)')
    parser.add_argument('--no-reparam', dest='reparam', action='store_false', help='do not reparameterize the model')
    parser.add_argument('--results-file', default='', help='also write the JSON result to this file')
    parser.add_argument('--no-progress', dest='progress', action='store_false', help='no progress bar')
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    args.command = f"{parser.prog} {shlex.join(argv)}"
    args.rerun = dict(module='eval.imagenet', args=R.portable_args(parser, argv, RERUN_DROP, RERUN_PATHS))
    if args.batch_size < 1 or args.workers < 0:
        parser.error('--batch-size must be >= 1 and --workers >= 0')
    return args


def _create_model(args):
    from timm.utils import reparameterize_model
    kwargs = {k: v for k, v in dict(num_classes=args.num_classes, global_pool=args.global_pool).items()
              if v is not None}
    model = create_model_checked(args.model, args.pretrained, args.checkpoint, **kwargs).eval()
    return reparameterize_model(model) if args.reparam else model


def _check_data_dir(args) -> None:
    root = Path(args.data_dir)
    if args.dataset:
        return  # hfds/, tfds/, wds/ sources are resolved by timm
    if not root.exists():
        raise UserError(f'--data-dir {root}: no such folder')
    if root.is_dir() and not any(p.suffix in IMG_EXTS for p in root.rglob('*')) \
            and not any(p.suffix == '.tar' for p in root.iterdir()):
        raise UserError(f'--data-dir {root}: no images found')


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    from timm.data import create_dataset, create_loader, resolve_data_config
    from torchmetrics.classification import MulticlassAccuracy
    from tqdm import tqdm
    args = parse_args(argv)
    _check_data_dir(args)
    if args.class_map and not Path(args.class_map).is_file():
        raise UserError(f'--class-map {args.class_map}: no such file')
    t_start = time.perf_counter()
    model = _create_model(args)
    num_outputs = getattr(model, 'num_classes', 0)
    if not num_outputs:
        raise UserError(f'{args.model} has no classifier (num_classes=0, an embedding model): build it with '
                        f'--num-classes (and --global-pool avg) and a --checkpoint that has one')
    try:
        dataset = create_dataset(root=args.data_dir, name=args.dataset, split=args.split,
                                 class_map=args.class_map or None)
    except (RuntimeError, ValueError, OSError, AssertionError) as e:
        raise UserError(f'--data-dir {args.data_dir}: {first_line(e)}') from None
    if len(dataset) == 0:
        raise UserError(f'--data-dir {args.data_dir}: no images found')
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or {}
    if class_to_idx:
        if args.class_map:
            if max(class_to_idx.values()) >= num_outputs:
                raise UserError(f'--class-map maps to index {max(class_to_idx.values())} but {args.model} has '
                                f'{num_outputs} outputs')
        elif len(class_to_idx) != num_outputs:
            raise UserError(f'{args.data_dir} has {len(class_to_idx)} classes but {args.model} has {num_outputs} '
                            f'outputs; give --class-map to map the folders to its outputs')
    data_config = resolve_data_config(
        dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation or None),
        model=model, verbose=False)
    device = torch.device(args.device)
    model = model.to(device)
    loader = create_loader(dataset, input_size=data_config['input_size'], batch_size=args.batch_size,
                           use_prefetcher=False, interpolation=data_config['interpolation'],
                           mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                           crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'])
    top1 = MulticlassAccuracy(num_classes=num_outputs, top_k=1, average='micro')
    top5 = MulticlassAccuracy(num_classes=num_outputs, top_k=5, average='micro') if num_outputs >= 5 else None
    loss_sum, count = 0.0, 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if device.type == 'cpu' else torch.float16) \
        if args.amp else torch.autocast(device.type, enabled=False)
    show = args.progress and sys.stderr.isatty()
    with torch.no_grad(), tqdm(total=len(dataset), unit='img', disable=not show, file=sys.stderr) as bar:
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            with amp:
                logits = model(images)
            logits = logits.float().cpu()
            target = target.cpu()
            loss_sum += torch.nn.functional.cross_entropy(logits, target, reduction='sum').item()
            count += len(target)
            top1.update(logits, target)
            if top5 is not None:
                top5.update(logits, target)
            bar.update(len(target))
    result = dict(
        model=args.model, checkpoint=args.checkpoint or None, data=args.data_dir, split=args.split,
        num_images=count, num_classes=num_outputs,
        top1=round(top1.compute().item() * 100, 3),
        top5=None if top5 is None else round(top5.compute().item() * 100, 3),
        loss=round(loss_sum / count, 5), img_size=list(data_config['input_size'][1:]),
        crop_pct=data_config['crop_pct'], interpolation=data_config['interpolation'],
        mean=list(data_config['mean']), std=list(data_config['std']), reparam=args.reparam,
        seconds=round(time.perf_counter() - t_start, 3), command=args.command, versions=versions(),
    )
    row = dict(dataset='imagenet', kind='classification', num=count, top1=result['top1'], top5=result['top5'])
    return finish(result, args, [row])


if __name__ == '__main__':
    main()
