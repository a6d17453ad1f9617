"""Hugging Face Hub folders for mobileone_112 weights: export, model card, push.

    python -m timm_mobileone.hub export --model mobileone_112_s1 --checkpoint CKPT --tag TAG --out DIR \
        [--results lfw.json ...]
    python -m timm_mobileone.hub card --model mobileone_112_s1 --tag TAG --repo-id ORG/NAME [--results ...]
    python -m timm_mobileone.hub push DIR --repo-id ORG/NAME [--private] [--revision REV]

An exported folder is one Hub repo: `model.safetensors` (train-time form, the file timm loads by default),
`model_fused.safetensors` (reparameterized; `timm.create_model(..., inference_mode=True)` loads it alone),
`config.json` (timm's format, written by timm's `save_config_for_hf`) and `README.md` (the model card, from
`hub_cards/TEMPLATE.md`, with a `model-index` of the eval results). Export refuses to write unless the fused model
computes the train-time model's function (float64 relative error <= 1e-6), and every file is written under a
temporary name first, then renamed: an interrupted export leaves no half-written file under a final name.

User mistakes print one `error: ...` line on stderr and exit with code 2. stdout carries one JSON object.
"""
import argparse
import json
import logging
import os
import re
import shlex
import shutil
import string
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import timm
from timm.utils import reparameterize_model

from . import __version__
from . import results as R
from .checkpoints import read_state_dict
from .cli import cli
from .deploy.profile import count_macs, count_params, fusion_error
from .errors import UserError, first_line
from .files import atomic_write
from .hub_files import CARD_NAME, CONFIG_NAME, EXPORT_FILES, FUSED_WEIGHTS_NAME
from .models.heads import infer_model_args

_logger = logging.getLogger(__name__)

# `card` writes here by default, relative to the current folder (the repository's card sources when run from its
# root); never next to the installed package
CARDS_DIR = Path('hub_cards')
CARD_TEMPLATE = Path(__file__).resolve().parent / 'card_template.md'  # hub_cards/TEMPLATE.md links here
FUSION_TOLERANCE = 1e-6  # float64 relative error; rounding is ~1e-15, a fusion bug 1e-3 or more
CARD_TAGS = ['image-feature-extraction', 'timm', 'face-recognition', 'mobileone']
DATASET_NAMES = {
    'lfw': 'LFW', 'cfp_fp': 'CFP-FP', 'cfp_ff': 'CFP-FF', 'agedb_30': 'AgeDB-30', 'calfw': 'CALFW',
    'cplfw': 'CPLFW', 'vgg2_fp': 'VGG2-FP', 'imagenet': 'ImageNet-1k', 'ijbb': 'IJB-B', 'ijbc': 'IJB-C',
}


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def load_train_time_model(model_name: str, checkpoint: str, **model_args) -> torch.nn.Module:
    if model_name not in timm.list_models('mobileone_112_*'):
        names = ', '.join(timm.list_models('mobileone_112_*'))
        raise UserError(f'--model {model_name}: not a mobileone_112 model ({names})')
    state_dict = read_state_dict(checkpoint)
    if any('reparam_conv' in k for k in state_dict):
        raise UserError(f'--checkpoint {checkpoint}: already fused (reparam_conv weights); export needs the '
                        f'train-time checkpoint, which it fuses itself')
    args = dict(infer_model_args(state_dict), **{k: v for k, v in model_args.items() if v is not None})
    try:
        model = timm.create_model(model_name, **args)
    except ValueError as e:
        raise UserError(f'{model_name}: {e}') from None
    result = model.load_state_dict(state_dict, strict=False)  # still raises on shape mismatch: see _load_checked
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f'--checkpoint {checkpoint} does not fit {model_name}: missing {len(result.missing_keys)} keys '
            f'({", ".join(result.missing_keys[:3])}{", ..." if len(result.missing_keys) > 3 else ""}), unexpected '
            f'{len(result.unexpected_keys)} ({", ".join(result.unexpected_keys[:3])}'
            f'{", ..." if len(result.unexpected_keys) > 3 else ""}); is it a checkpoint of another variant?')
    return model.eval()


def _load_checked(model_name: str, checkpoint: str, **model_args) -> torch.nn.Module:
    try:
        return load_train_time_model(model_name, checkpoint, **model_args)
    except RuntimeError as e:  # size mismatch from load_state_dict
        detail = re.search(r'size mismatch for ([^:]+): (.*)', str(e))
        what = f'{detail.group(1)}: {detail.group(2)}' if detail else first_line(e)
        raise UserError(f'--checkpoint {checkpoint} does not fit {model_name} ({what}); is it a checkpoint of '
                        f'another variant?') from None


# ----------------------------------------------------------------------------------------------------------------
# model card


def _result_rows(paths: Sequence[str]) -> List[Dict[str, Any]]:
    """The schema rows of eval result files (timm_mobileone.results), each with the `rerun` of its file."""
    rows = []
    for path in paths:
        obj = R.read(path)
        rows += [dict(r, rerun=obj['rerun']) for r in obj['rows']]
    return rows


def card_data(model_name: str, tag: str, rows: List[Dict[str, Any]], license: str, datasets: Sequence[str]):
    from huggingface_hub import EvalResult, ModelCardData
    results = []
    for r in rows:
        name = DATASET_NAMES.get(r['dataset'], r['dataset'])
        if r['kind'] == 'verification':
            results.append(EvalResult(
                task_type='face-verification', task_name='Face verification', dataset_type=r['dataset'],
                dataset_name=name, metric_type='accuracy', metric_value=r['accuracy'],
                metric_name='Accuracy (10-fold, flip)' if r.get('flip') else 'Accuracy (10-fold)'))
            if r.get('tar_at_far') is not None:
                results.append(EvalResult(
                    task_type='face-verification', task_name='Face verification', dataset_type=r['dataset'],
                    dataset_name=name, metric_type='tar_at_far', metric_value=r['tar_at_far'],
                    metric_name=f"TAR@FAR={r['far_target']:g}"))
        elif r['kind'] == 'ijb':
            for far, tar in r['tar_at_far'].items():
                results.append(EvalResult(
                    task_type='face-verification', task_name='Face verification (1:1 templates)',
                    dataset_type=r['dataset'], dataset_name=name, metric_type='tar_at_far', metric_value=tar,
                    metric_name=f'TAR@FAR={far}'))
        else:
            results.append(EvalResult(
                task_type='image-classification', task_name='Image classification', dataset_type='imagenet-1k',
                dataset_name=name, metric_type='accuracy', metric_value=r['top1'], metric_name='Top-1 accuracy'))
    return ModelCardData(
        library_name='timm', license=license, pipeline_tag='image-feature-extraction', tags=list(CARD_TAGS),
        datasets=list(datasets) or None, model_name=f'{model_name}.{tag}', eval_results=results or None)


def render_card(model: torch.nn.Module, tag: str, repo_id: str, rows: List[Dict[str, Any]], license: str = 'apache-2.0',
                datasets: Sequence[str] = (), train_data: str = '', template: Optional[Path] = None) -> str:
    """The model card text: YAML front matter (huggingface_hub's ModelCardData, with model-index) + template body."""
    from huggingface_hub import ModelCard
    name = model.pretrained_cfg['architecture']
    fused = reparameterize_model(model)
    input_size = tuple(model.pretrained_cfg['input_size'])
    lines, ijb_lines = [], []
    for r in rows:
        label = DATASET_NAMES.get(r['dataset'], r['dataset'])
        quoted = R.rerun_command(r.get('rerun'), repo_id)
        command = f"`{quoted}`" if quoted else '(command not recorded)'
        if r['kind'] == 'verification':
            tar = '' if r.get('tar_at_far') is None else f"{r['tar_at_far']:.5f}"
            std = '' if r.get('accuracy_std') is None else f" ± {r['accuracy_std']:.5f}"
            lines.append(f"| {label} | {r.get('num') or ''} pairs | {r['accuracy']:.5f}{std} | {tar} | {command} |")
        elif r['kind'] == 'ijb':
            tars = ' | '.join(f'{r["tar_at_far"][k]:.5f}' for k in R.IJB_FARS)
            ijb_lines.append(f"| {label} | {r.get('num') or ''} pairs | {tars} | {command} |")
        else:
            top5 = '' if r.get('top5') is None else f" (top-5 {r['top5']:.3f})"
            lines.append(f"| {label} | {r.get('num') or ''} images | top-1 {r['top1']:.3f}{top5} | | {command} |")
    tables = []
    if lines:
        tables.append('\n'.join(['| dataset | size | accuracy | TAR@FAR=1e-3 | command |', '|---|---|---|---|---|',
                                 *lines]))
    if ijb_lines:
        tables.append('\n'.join([
            "IJB-B / IJB-C 1:1 template verification, insightface's `eval_ijbc.py` protocol (flip test, feature norm "
            "and detector score kept): TAR at each FAR.", '',
            '| dataset | size | ' + ' | '.join(f'FAR={k}' for k in R.IJB_FARS) + ' | command |',
            '|---|---|' + '---|' * len(R.IJB_FARS) + '---|', *ijb_lines]))
    results_table = '\n\n'.join(tables) if tables else 'No evaluation results were recorded for this export.'
    body_template = string.Template((template or CARD_TEMPLATE).read_text())
    body = body_template.substitute(
        model_name=name, tag=tag, repo_id=repo_id,
        params_m=f'{count_params(model) / 1e6:.2f}', fused_params_m=f'{count_params(fused) / 1e6:.2f}',
        gmacs=f'{count_macs(model, input_size) / 1e9:.3f}', fused_gmacs=f'{count_macs(fused, input_size) / 1e9:.3f}',
        input_size=f'{input_size[1]}x{input_size[2]}', embed_dim=str(model.head_hidden_size),
        train_data=train_data or 'not recorded', license=license, results_table=results_table,
        block_note=(f'\n\nIts training-time blocks are Diverse Branch Blocks (https://arxiv.org/abs/2103.13425) '
                    f'instead of MobileOne blocks; fused, it is exactly the fused '
                    f'`{name.replace("_dbb_", "_")}` network.' if '_dbb_' in name else ''),
    )
    data = card_data(name, tag, rows, license, datasets)
    card = ModelCard(f'---\n{data.to_yaml()}\n---\n{body}')
    return str(card)


# ----------------------------------------------------------------------------------------------------------------
# export / push


def _atomic_dir_writes(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix='.export-', dir=out))


def export(model_name: str, checkpoint: str, tag: str, out: str, results: Sequence[str] = (), repo_id: str = '',
           license: str = 'apache-2.0', datasets: Sequence[str] = (), train_data: str = '',
           **model_args) -> Dict[str, Any]:
    """Write the Hub folder of a train-time checkpoint: both weight files, config.json, model card."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf
    if not re.fullmatch(r'[a-z0-9][a-z0-9_]*', tag):
        raise UserError(f'--tag {tag!r}: use lowercase letters, digits and _ (e.g. ms1mv3_arcface)')
    rows = _result_rows(results)
    model = _load_checked(model_name, checkpoint, **model_args)
    err64 = fusion_error(model, torch.float64)
    if not err64 <= FUSION_TOLERANCE:
        raise UserError(f'refusing to export {checkpoint}: the fused model differs from the train-time one '
                        f'(float64 relative error {err64:.3g} > {FUSION_TOLERANCE:g}); are its BatchNorm statistics '
                        f'finite and positive?')
    err32 = fusion_error(model, torch.float32)
    fused = reparameterize_model(model)
    repo_id = repo_id or f'ORG/{model_name}.{tag}'
    out_dir = Path(out)
    tmp = _atomic_dir_writes(out_dir)
    try:
        # timm writes the train-time model.safetensors and config.json; the fused file is ours
        model.pretrained_cfg = dict(model.pretrained_cfg, tag=tag, license=license, notes=None)
        save_for_hf(model, str(tmp), model_config=dict(pretrained_cfg=dict(tag=tag)), safe_serialization=True)
        verification = face_verification(rows)
        if verification:  # where the model's own verification said same / different (timm ignores the key)
            config = json.loads((tmp / CONFIG_NAME).read_text())
            (tmp / CONFIG_NAME).write_text(json.dumps(dict(config, face_verification=verification), indent=2))
        save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, str(tmp / FUSED_WEIGHTS_NAME),
                  metadata={'format': 'pt'})
        (tmp / CARD_NAME).write_text(render_card(model, tag, repo_id, rows, license, datasets, train_data))
        for name in EXPORT_FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(
        model=model_name, tag=tag, out=str(out_dir), checkpoint=checkpoint,
        files={n: (out_dir / n).stat().st_size for n in EXPORT_FILES},
        params=count_params(model), fused_params=count_params(fused),
        fusion_rel_err_float64=err64, fusion_rel_err_float32=err32, results=len(rows),
    )


def face_verification(rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """config.json's `face_verification`: the cosine threshold of the first verification result that has one (what
    `python -m timm_mobileone.faces compare` answers same / different at for this model), its dataset and rule."""
    for r in rows:
        if r.get('kind') == 'verification' and isinstance(r.get('threshold'), (int, float)):
            return dict(threshold=float(r['threshold']), dataset=r['dataset'], accuracy=r.get('accuracy'),
                        rule='same when cosine >= threshold')
    return None


def push(folder: str, repo_id: str, private: bool = False, revision: Optional[str] = None,
         token: Optional[str] = None, commit_message: str = 'Add mobileone_112 weights') -> Dict[str, Any]:
    """Create the Hub repo (if needed) and upload an exported folder with huggingface_hub."""
    from huggingface_hub import HfApi, get_token
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise UserError(f'{folder}: no such folder (export one with python -m timm_mobileone.hub export)')
    missing = [n for n in EXPORT_FILES if not (folder_path / n).is_file()]
    if missing:
        raise UserError(f'{folder}: missing {", ".join(missing)}; export it with python -m timm_mobileone.hub export')
    if not re.fullmatch(r'[\w.-]+/[\w.-]+', repo_id):
        raise UserError(f'--repo-id {repo_id!r}: expected ORG/NAME')
    token = token or get_token()
    if not token:
        raise UserError('no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again')
    api = HfApi(token=token, library_name='timm_mobileone', library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        repo_id = url.repo_id
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder_path), revision=revision,
                                 commit_message=commit_message, allow_patterns=list(EXPORT_FILES))
    except Exception as e:  # huggingface_hub raises HfHubHTTPError and network errors
        raise UserError(f'push to {repo_id} failed: {first_line(e)}') from None
    return dict(repo_id=repo_id, revision=revision, commit_url=getattr(info, 'commit_url', str(info)),
                files=list(EXPORT_FILES))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog='python -m timm_mobileone.hub', description=__doc__.splitlines()[0],
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest='command', required=True)

    def model_flags(p, need_checkpoint=True):
        p.add_argument('-m', '--model', required=True, help='architecture, e.g. mobileone_112_s1')
        p.add_argument('--checkpoint', required=need_checkpoint, default='',
                       help='train-time checkpoint (.safetensors, or a torch file read with weights_only=True)')
        p.add_argument('--tag', required=True, help='pretrained tag, e.g. ms1mv3_arcface')
        p.add_argument('--results', action='append', default=[], metavar='EVAL.json',
                       help='eval result JSON (eval.lfw / eval.verify / eval.ijb / eval.imagenet --results-file), '
                            'repeatable')
        p.add_argument('--repo-id', default='', help='Hub repo the card describes (ORG/NAME)')
        p.add_argument('--license', default='apache-2.0', help='licence of the weights')
        p.add_argument('--dataset', action='append', default=[], help='training dataset id for the card, repeatable')
        p.add_argument('--train-data', default='', help='training data, in words, for the card')
        p.add_argument('--embed-dim', type=int, default=None, help='embedding size (default: from the checkpoint)')
        p.add_argument('--num-classes', type=int, default=None, help='classifier size (default: from the checkpoint)')

    p = sub.add_parser('export', help='write a Hub folder from a train-time checkpoint', formatter_class=fmt)
    model_flags(p)
    p.add_argument('--out', required=True, help='output folder')

    p = sub.add_parser('card', help='(re)generate a model card', formatter_class=fmt)
    model_flags(p, need_checkpoint=False)
    p.add_argument('--out', default='',
                   help='card path (default: ./hub_cards/<model>.<tag>/README.md, in the current folder)')

    p = sub.add_parser('push', help='upload an exported folder to the Hub', formatter_class=fmt)
    p.add_argument('folder', help='exported folder')
    p.add_argument('--repo-id', required=True, help='ORG/NAME')
    p.add_argument('--private', action='store_true', help='create the repo private')
    p.add_argument('--revision', default=None, help='branch to push to (created if missing)')
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the saved login)')
    return parser.parse_args(argv)


def _card_command(args) -> Dict[str, Any]:
    rows = _result_rows(args.results)
    if args.checkpoint:
        model = _load_checked(args.model, args.checkpoint, embed_dim=args.embed_dim, num_classes=args.num_classes)
    else:
        if args.model not in timm.list_models('mobileone_112_*'):
            raise UserError(f'--model {args.model}: not a mobileone_112 model')
        kw = {k: v for k, v in dict(embed_dim=args.embed_dim, num_classes=args.num_classes).items() if v is not None}
        model = timm.create_model(args.model, **kw).eval()
    out = Path(args.out) if args.out else CARDS_DIR / f'{args.model}.{args.tag}' / CARD_NAME
    text = render_card(model, args.tag, args.repo_id or f'ORG/{args.model}.{args.tag}', rows, args.license,
                       args.dataset, args.train_data)
    atomic_write(out, lambda f: f.write(text.encode()))
    return dict(card=str(out), results=len(rows))


@cli
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.command == 'export':
        result = export(args.model, args.checkpoint, args.tag, args.out, args.results, args.repo_id,
                        args.license, args.dataset, args.train_data, embed_dim=args.embed_dim,
                        num_classes=args.num_classes)
    elif args.command == 'card':
        result = _card_command(args)
    else:
        result = push(args.folder, args.repo_id, args.private, args.revision, args.token)
    result['command'] = 'python -m timm_mobileone.hub ' + ' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
