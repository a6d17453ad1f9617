"""Model weights from a file, for every CLI: one reader for any checkpoint and the checked model builder.

Reads safetensors, torch and insightface's MXNet `.params` files; whatever is wrong with a file or a model name is one
`UserError` line. (A training run's folder of resume checkpoints is `train/checkpoint.py`, in the repository only.)"""
from pathlib import Path
from typing import Union

from .errors import UserError, first_line
from .models.heads import infer_model_args
from .mxnet import MXNetError, read_params, read_symbol, symbol_path_for

__all__ = ['read_state_dict', 'create_model_checked']


def read_state_dict(path: Union[str, Path], flag: str = '--checkpoint'):
    """A state dict of tensors from safetensors or a torch checkpoint (read with weights_only=True).

    Unwraps `state_dict` / `model` entries and strips a `module.` prefix. Whatever is wrong with the file
    (missing, truncated, corrupt header, a pickle of something else) raises UserError naming it.
    """
    import torch
    p = Path(path)
    if not p.is_file():
        raise UserError(f'{flag} {path}: no such file')
    if p.suffix == '.params':  # insightface's MXNet checkpoints: arrays by MXNet name, converted on loading
        try:
            return {k: torch.from_numpy(v) for k, v in read_params(p).items()}
        except MXNetError as e:
            raise UserError(f'{flag} {e}') from None
    try:
        if p.suffix == '.safetensors':
            from safetensors.torch import load_file
            state_dict = load_file(str(p), device='cpu')
        else:
            state_dict = torch.load(str(p), map_location='cpu', weights_only=True)
    except Exception as e:  # safetensors, torch's zip reader and its unpickler raise many unrelated types
        raise UserError(f'{flag} {path}: cannot be read, corrupt or truncated? ({first_line(e)})') from None
    if isinstance(state_dict, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
    if not isinstance(state_dict, dict) or not state_dict or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise UserError(f'{flag} {path}: not a state dict of tensors')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def create_model_checked(model_name: str, pretrained: bool = False, checkpoint: str = '', **kwargs):
    """`timm.create_model` for the CLIs: a missing checkpoint, unknown name or unusable weights raise one line.

    An MXNet `.params` checkpoint (insightface) loads into a model that has an MXNet port (`mobilefacenet`), its
    `-symbol.json` beside it checked against the model first.
    """
    import timm
    state = read_state_dict(checkpoint) if checkpoint else None  # a file timm's loader would choke on: one line
    mxnet = bool(checkpoint) and Path(checkpoint).suffix == '.params'
    if state is not None and not mxnet and model_name in timm.list_models('mobileone_112_*'):
        # the head's sizes as the weights were trained (a distilled student's embed_dim=128 loads as given)
        for key, value in infer_model_args(state).items():
            kwargs.setdefault(key, value)
    try:
        model = timm.create_model(model_name, pretrained=pretrained,
                                  checkpoint_path=checkpoint if checkpoint and not mxnet else None, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise UserError(f'cannot create model {model_name!r}: {first_line(e)}') from None
    if mxnet:
        _load_mxnet(model, model_name, checkpoint, state)
    return model


def _load_mxnet(model, model_name: str, checkpoint: str, state) -> None:
    """Load MXNet arrays (by MXNet name) into `model` through its family's port, or raise UserError."""
    import sys
    check = getattr(sys.modules.get(type(model).__module__), 'check_mxnet_symbol', None)
    if check is None:
        raise UserError(f'--checkpoint {checkpoint}: an MXNet checkpoint, and {model_name} has no MXNet port '
                        f'(mobilefacenet has)')
    symbol = symbol_path_for(checkpoint)
    try:
        if symbol.is_file():
            check(read_symbol(symbol), model, str(symbol))
        result = model.load_state_dict(state, strict=False)
    except MXNetError as e:
        raise UserError(f'--checkpoint {e}') from None
    except KeyError as e:
        raise UserError(f'--checkpoint {checkpoint}: {e.args[0]}') from None
    except RuntimeError as e:  # size mismatch
        detail = [line.strip() for line in str(e).splitlines() if 'size mismatch' in line]
        raise UserError(f'--checkpoint {checkpoint} does not fit {model_name}: '
                        f'{detail[0] if detail else first_line(e)}') from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f'--checkpoint {checkpoint} does not fit {model_name}: it lacks {len(result.missing_keys)} tensors the '
            f'model needs ({", ".join(result.missing_keys[:4])}{" ..." if len(result.missing_keys) > 4 else ""})'
            + (f', holds {len(result.unexpected_keys)} it lacks' if result.unexpected_keys else ''))
