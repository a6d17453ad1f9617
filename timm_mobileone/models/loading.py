""" How the model families load weights: the checks and hooks their `_create_*` functions share

* `require_weights`: `pretrained=True` on a cfg with nothing to load raises one error naming what does exist,
  instead of timm's generic "No pretrained weights exist ... Use pretrained=False".
* `fused_weights_source`: `pretrained=True, inference_mode=True` loads the fused file of a Hub repo or local folder
  (`model_fused.safetensors`, beside the train-time `model.safetensors`).
* `upstream_checkpoint_hook`: a `load_state_dict` pre-hook that converts an upstream checkpoint (Apple's MobileOne
  keys, insightface's MXNet names), so `load_state_dict` and timm's `checkpoint_path=` take it as
  `pretrained=True` does.

The file names and the advice text come from `timm_mobileone.hub_files`, a leaf shared with the Hub tools.
"""
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import torch
import torch.nn as nn

from huggingface_hub.errors import EntryNotFoundError

from timm.models import resolve_pretrained_cfg

from ..hub_files import FUSED_WEIGHTS_NAME, missing_fused_file, missing_fused_hub_file, no_fused_weights

__all__ = ['require_weights', 'fused_weights_source', 'upstream_checkpoint_hook']


def require_weights(variant: str, pretrained: bool, kwargs: Dict[str, Any], advice: str) -> None:
    """For `pretrained=True` on a cfg with no weights to load: one error that names what does exist (`advice`)
    instead of timm's generic "No pretrained weights exist ... Use pretrained=False". A source given at the call
    (`hf-hub:` / `local-dir:` names, `pretrained_cfg_overlay=dict(file=...)`) passes."""
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if not (cfg.url or cfg.hf_hub_id or cfg.file or cfg.state_dict):
        raise RuntimeError(f'No pretrained weights exist for {variant}.{cfg.tag}: {advice}')


def _fused_weights_overlay(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Point the pretrained source at the fused weights file, for `pretrained=True, inference_mode=True`.

    Hub repos and local folders exported by `timm_mobileone.hub` hold `model_fused.safetensors` beside the
    train-time `model.safetensors`; the fused model loads the former alone. An explicit `file=` is used as given.
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    if cfg.source == 'local-dir':
        folder = Path(cfg.file)
        fused = folder / FUSED_WEIGHTS_NAME
        if not fused.is_file():
            raise FileNotFoundError(missing_fused_file(str(folder)))
        return dict(source='', file=str(fused))
    if cfg.file or cfg.state_dict:
        return {}
    if cfg.hf_hub_id:
        return dict(hf_hub_filename=FUSED_WEIGHTS_NAME)
    raise RuntimeError(no_fused_weights(variant, cfg.tag))


@contextmanager
def fused_weights_source(variant: str, pretrained: bool, kwargs: Dict[str, Any]) -> Iterator[None]:
    """Around a `build_model_with_cfg` call: for `pretrained=True, inference_mode=True`, point `kwargs`'
    `pretrained_cfg_overlay` (changed in place) at the fused weights file, and turn a Hub repo without that file into
    one error saying what to do. Any other call passes through untouched."""
    if not (pretrained and kwargs.get('inference_mode', False)):
        yield
        return
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    overlay.update(_fused_weights_overlay(variant, kwargs))
    kwargs['pretrained_cfg_overlay'] = overlay
    try:
        yield
    except EntryNotFoundError as e:
        raise RuntimeError(missing_fused_hub_file(overlay.get('hf_hub_filename', FUSED_WEIGHTS_NAME), variant)) from e


def upstream_checkpoint_hook(is_upstream: Callable[[Dict[str, Any]], bool],
                             adapt: Callable[[Dict[str, Any], nn.Module], Dict[str, torch.Tensor]]) -> Callable:
    """A `load_state_dict` pre-hook that rewrites an upstream checkpoint (recognized by `is_upstream`) with
    `adapt(state_dict, module)`, so that `model.load_state_dict(...)` and `create_model(..., checkpoint_path=...)`
    take it too: timm's load_checkpoint does not apply the pretrained filter fn."""

    def hook(module, state_dict, prefix, *args, **kwargs) -> None:
        sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not is_upstream(sub):
            return
        adapted = adapt(sub, module)
        for k in sub:
            del state_dict[prefix + k]
        for k, v in adapted.items():
            state_dict[prefix + k] = v
    return hook
