"""What a model or an exported artifact is (`ModelSpec`, `ArtifactSpec`), and loading it into an `Embedder`.

Part of eval's public API (`eval.api` re-exports these names). Error messages name the eval CLIs' flags (`--artifact`,
`--device`, `--std`): the CLIs are this code's main callers, and their one `error:` line is unchanged.
"""
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from timm_mobileone.checkpoints import create_model_checked
from timm_mobileone.deploy import formats
from timm_mobileone.errors import UserError, first_line

DEFAULT_MODEL = 'mobileone_112_s0'  # eval's --model default


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


@dataclass(frozen=True)
class ModelSpec:
    """A timm model to evaluate in PyTorch: `model` (a registry name with optional .tag, 'hf-hub:ORG/NAME' or
    'local-dir:DIR'), its weights (`checkpoint` and/or `pretrained`), its form (`reparam`: the fused, deployed form)
    and placement (`device`, `channels_last`). The preprocessing fields override the model's cfg: `mean`/`std` as
    fractions of 255, `raw_pixels` (feed 0..255 unnormalized), `channel_order` ('rgb' or 'bgr')."""
    model: str = DEFAULT_MODEL
    checkpoint: str = ''
    pretrained: bool = False
    reparam: bool = True
    device: str = field(default_factory=default_device)
    channels_last: bool = True
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    raw_pixels: bool = False
    channel_order: str = 'rgb'


@dataclass(frozen=True)
class ArtifactSpec:
    """An exported model (`timm_mobileone.export --format`) run by `runtime` (one of
    `timm_mobileone.deploy.formats.RUNNABLE`: .onnx, .pte, ncnn .param with its .bin beside it). The artifact holds
    its weights; `model` (a timm name) only supplies the preprocessing cfg, which the preprocessing fields override
    as in `ModelSpec`. `via_onnx_flag`: given as the CLIs' legacy `--onnx PATH` (errors name that flag and the
    result's `onnx` field holds the path)."""
    path: str
    runtime: str = 'onnx'
    model: str = DEFAULT_MODEL
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    raw_pixels: bool = False
    channel_order: str = 'rgb'
    via_onnx_flag: bool = False


Spec = Union[ModelSpec, ArtifactSpec]


class ArtifactModel:
    """An exported artifact run by its runtime (`timm_mobileone.deploy.formats`), called like a model: (B, C, H, W)
    tensor in, (B, D) tensor out. Artifacts exported at a fixed batch size run in chunks of it (ExecuTorch, ncnn: one
    image)."""

    def __init__(self, runtime: str, path: str, pretrained_cfg: Dict):
        fmt = formats.FORMATS[runtime]
        fmt.require(flag='--runtime')
        try:
            with formats.quiet():
                self.run = fmt.runner(path)
                self.run(np.zeros((1, *pretrained_cfg['input_size']), np.float32))
        except UserError as e:
            raise UserError(f'--artifact {e}') from None
        except Exception as e:  # the runtime's own complaint, e.g. an input shape the program was not exported for
            raise UserError(f'--artifact {path}: {fmt.runtime} cannot run it on --model\'s input '
                            f'{"x".join(map(str, pretrained_cfg["input_size"]))} ({first_line(e)})') from None
        self.pretrained_cfg = pretrained_cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)))


@dataclass(frozen=True, eq=False)
class Embedder:
    """A loaded model (`load_model`, `wrap_model`): `model` maps a (B, C, H, W) float tensor to (B, D) raw
    embeddings (an nn.Module in eval mode on the spec's device, or an `ArtifactModel`); `data_cfg` is its input cfg
    (timm's data config with `raw_pixels` and `channel_order`); `spec` says what it is (and is what results record)."""
    spec: Spec
    model: Callable[[torch.Tensor], torch.Tensor]
    data_cfg: Dict[str, Any]

    @property
    def is_artifact(self) -> bool:
        return isinstance(self.model, ArtifactModel)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the spec's device; the CPU for artifacts (their runtimes take host arrays)."""
        if self.is_artifact or isinstance(self.spec, ArtifactSpec):
            return torch.device('cpu')
        return torch.device(self.spec.device)

    @property
    def channels_last(self) -> bool:
        return isinstance(self.spec, ModelSpec) and self.spec.channels_last and not self.is_artifact

    @property
    def input_size(self) -> Tuple[int, int]:
        return tuple(self.data_cfg['input_size'][-2:])

    @property
    def tag(self) -> Optional[str]:
        return getattr(self.model, 'pretrained_cfg', {}).get('tag')

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def input_cfg(data_cfg: Dict, spec: Spec) -> Dict:
    """The data cfg with the spec's mean/std/raw_pixels/channel_order applied."""
    data_cfg = dict(data_cfg)
    if spec.mean:
        data_cfg['mean'] = tuple(spec.mean)
    if spec.std:
        if not all(s > 0 for s in spec.std):
            raise UserError(f'--std {" ".join(map(str, spec.std))}: must be positive')
        data_cfg['std'] = tuple(spec.std)
    data_cfg['raw_pixels'] = bool(spec.raw_pixels)
    data_cfg['channel_order'] = spec.channel_order
    return data_cfg


def check_artifact(spec: ArtifactSpec) -> None:
    """UserError for an artifact that cannot be run as specified: one that normalizes its input inside its graph
    given without raw pixels, or a missing file."""
    path = spec.path
    if Path(path).is_file() and not spec.raw_pixels:
        inside = formats.normalizes_inside(spec.runtime, path)
        if inside:
            raise UserError(f'--artifact {path} normalizes its input inside its graph ({inside}): it takes 0..255 '
                            f'pixels; add --raw-pixels (and --channel-order bgr if it was exported for BGR)')
    if not Path(path).is_file():
        raise UserError(f'{"--onnx" if spec.via_onnx_flag else "--artifact"} {path}: no such file')


def _data_cfg(model) -> Dict:
    import timm
    if isinstance(model, ArtifactModel):
        return timm.data.resolve_data_config(pretrained_cfg=model.pretrained_cfg)
    return timm.data.resolve_model_data_config(model)


def load_model(spec: Spec) -> Embedder:
    """Build what `spec` names: the timm model with its weights, in eval mode, reparameterized (`spec.reparam`), on
    `spec.device`, channels_last (`spec.channels_last`); or the artifact in its runtime (`check_artifact` first).
    UserError for what cannot be loaded."""
    import timm
    import timm_mobileone  # noqa: F401  (registers the mobileone_112 models)
    if isinstance(spec, ArtifactSpec):
        check_artifact(spec)
        model = ArtifactModel(spec.runtime, spec.path, timm.create_model(spec.model).pretrained_cfg)
    else:
        model = create_model_checked(spec.model, spec.pretrained, spec.checkpoint)
        model.eval()
        if spec.reparam:
            model = timm.utils.reparameterize_model(model)
        try:
            model = model.to(spec.device)
        except (RuntimeError, AssertionError) as e:
            raise UserError(f'--device {spec.device}: {e}') from None
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
    return Embedder(spec=spec, model=model, data_cfg=input_cfg(_data_cfg(model), spec))


def wrap_model(model: Callable[[torch.Tensor], torch.Tensor], device: Union[str, torch.device] = 'cpu',
               spec: Optional[ModelSpec] = None) -> Embedder:
    """An Embedder of an already built model: an nn.Module in eval mode on `device` (training validation passes its
    fused copy) or an `ArtifactModel`. Its input cfg comes from the model's own cfg (`spec`'s preprocessing fields
    applied); `spec` is what results record (default: eval's defaults, as the eval.verify command line without
    model flags: `model` is then eval's default name, whatever `model` is), placed on `device`."""
    spec = replace(spec if spec is not None else ModelSpec(), device=str(device))
    return Embedder(spec=spec, model=model, data_cfg=input_cfg(_data_cfg(model), spec))
