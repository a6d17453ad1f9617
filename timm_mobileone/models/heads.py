""" The face embedding heads both model families use, and the classifier / pool calls they share

MobileOne-112 (`mobileone_112.py`, and the DBB family built on it in `dbb.py`) and the MobileFaceNet port
(`mobilefacenet.py`) end in the same head: MobileFaceNet's global depthwise conv ("GDC",
https://arxiv.org/abs/1804.07573), a depthwise conv whose kernel covers the whole final map + BN2d, flatten, a linear
projection to the embedding and BatchNorm1d (`GDCHead`). MobileOne-112 also offers `Conv1x1Head` (a 1x1 channel
reduction in place of the depthwise conv). Both fold every BatchNorm on `reparameterize()`, and `inference_mode=True`
builds that fused layout directly.

The GDC kernel is the final map of a 112x112 crop after four stride-2 convs (7x7, `feat_size_for`); a head refuses
any other map size with a ValueError naming the input size the model was built for.

Also here: the `num_classes` / `global_pool` checks and `reset_classifier` with timm's meaning
(`reset_face_classifier`), which both families share, and the head arguments a state dict was trained with
(`infer_model_args`).
"""
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from timm.layers import ConvNormAct, get_device_dtype, register_notrace_function, to_2tuple

__all__ = [
    'GDC_POOL', 'GDCHead', 'Conv1x1Head', 'HEAD_TYPES', 'feat_size_for', 'default_head_chs', 'check_num_classes',
    'check_global_pool', 'reset_face_classifier', 'infer_model_args',
]

NUM_DOWNSAMPLES = 4  # stem, stages 2, 3 and 4 each halve the map (3x3 convs, padding 1)
GDC_POOL = 'gdc'


def feat_size_for(img_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """Size of the final feature map (what the GDC kernel covers) for an input of `img_size`."""
    size = []
    for s in to_2tuple(img_size):
        for _ in range(NUM_DOWNSAMPLES):
            s = (s - 1) // 2 + 1  # 3x3 conv, stride 2, padding 1
        size.append(s)
    return size[0], size[1]


def check_num_classes(num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f'num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}')


def check_global_pool(global_pool: Any) -> None:
    """'gdc' (the face embedding head) or one of timm's pool types; '' is no pooling. As timm's ClassifierHead,
    '' with a classifier is accepted: its linear layer then takes the unpooled map's last dimension."""
    valid = (GDC_POOL, 'avg', 'max', 'avgmax', 'catavgmax', '')
    if global_pool not in valid:
        raise ValueError(f'global_pool must be one of {valid}, got {global_pool!r}')


@register_notrace_function  # a leaf for timm's fx tracing (fx only autowraps names without a leading '_')
def gdc_check_feat_size(x: torch.Tensor, feat_size: Tuple[int, int], img_size: Tuple[int, int]) -> torch.Tensor:
    if x.shape[-2] != feat_size[0] or x.shape[-1] != feat_size[1]:
        raise ValueError(
            f'The GDC head was built for {img_size[0]}x{img_size[1]} input (a {feat_size[0]}x{feat_size[1]} '
            f'feature map) but got a {x.shape[-2]}x{x.shape[-1]} map; resize the input to '
            f'{img_size[0]}x{img_size[1]} or create the model with img_size=<your size>.')
    return x


def _fuse_conv_norm(module: nn.Module) -> nn.Module:
    """A ConvNormAct without activation (eval-mode BN) as one conv with bias, same geometry; others unchanged."""
    if not isinstance(module, ConvNormAct):
        return module
    conv, bn = module.conv, module.bn
    weight, bias = fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, groups=conv.groups, bias=True, **get_device_dtype(conv))
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


class _EmbeddingHead(nn.Module):
    """Shared part of the embedding heads: a conv over the final map (+ BN2d), flatten, linear projection to the
    embedding (no bias) + BatchNorm1d, then dropout and an optional classifier. Fused: the conv and the projection
    carry a bias, both BNs folded in, `norm` is Identity.
    """
    conv_name = ''

    def __init__(
            self,
            conv: nn.Module,
            flat_features: int,
            in_features: int,
            embed_dim: int,
            num_classes: int,
            feat_size: Tuple[int, int],
            img_size: Tuple[int, int],
            drop_rate: float,
            inference_mode: bool,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        setattr(self, self.conv_name, conv)
        self.in_features = in_features
        self.flat_features = flat_features
        self.embed_dim = self.num_features = embed_dim
        self.feat_size = tuple(feat_size)
        self.img_size = tuple(img_size)
        self.proj = nn.Linear(flat_features, embed_dim, bias=inference_mode, **dd)
        self.norm = nn.Identity() if inference_mode else nn.BatchNorm1d(embed_dim, **dd)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        """Replace the classifier after the embedding (0: none)."""
        dd = get_device_dtype(self.proj)
        self.fc = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = gdc_check_feat_size(x, self.feat_size, self.img_size)
        x = self.flatten(self._reduce(x))
        x = self.norm(self.proj(x))
        if pre_logits:
            return x
        return self.fc(self.drop(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN2d into the conv and the BatchNorm1d into the projection (eval-mode statistics)."""
        if not isinstance(self.norm, nn.BatchNorm1d):
            return
        setattr(self, self.conv_name, _fuse_conv_norm(getattr(self, self.conv_name)))
        norm = self.norm
        weight, bias = fuse_linear_bn_weights(
            self.proj.weight, self.proj.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
        proj = nn.Linear(self.flat_features, self.embed_dim, bias=True, **get_device_dtype(self.proj))
        proj.weight.copy_(weight)
        proj.bias.copy_(bias)
        self.proj = proj
        self.norm = nn.Identity()


class GDCHead(_EmbeddingHead):
    """Global depthwise conv embedding head (MobileFaceNet), optional classifier.

    Train-time: `conv_dw` (depthwise conv whose kernel is the whole map, + BN2d) -> flatten -> `proj` (linear, no
    bias) -> `norm` (BatchNorm1d) = embedding -> dropout -> `fc`. Fused: `conv_dw` and `proj` are plain conv /
    linear with bias, `norm` is Identity.
    """
    conv_name = 'conv_dw'

    def __init__(
            self,
            in_features: int,
            embed_dim: int = 512,
            num_classes: int = 0,
            feat_size: Tuple[int, int] = (7, 7),
            img_size: Tuple[int, int] = (112, 112),
            drop_rate: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_features: Channels of the final feature map.
            embed_dim: Embedding size.
            num_classes: Classifier outputs after the embedding (0: none).
            feat_size: Final feature map size, the GDC kernel size.
            img_size: Input size the model was built for (for error messages).
            drop_rate: Dropout before the classifier.
            inference_mode: Build the fused layout.
        """
        dd = {'device': device, 'dtype': dtype}
        if inference_mode:
            conv = nn.Conv2d(in_features, in_features, tuple(feat_size), groups=in_features, bias=True, **dd)
        else:
            conv = ConvNormAct(
                in_features, in_features, tuple(feat_size), padding=0, groups=in_features, apply_act=False, **dd)
        super().__init__(conv, in_features, in_features, embed_dim, num_classes, feat_size, img_size, drop_rate,
                         inference_mode, **dd)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_dw(x)


def default_head_chs(in_features: int, feat_size: Tuple[int, int] = (7, 7), embed_dim: int = 512) -> int:
    """The `head_chs` of the conv1x1 head: the multiple of 8 whose head has about the GDC head's parameters.

    GDC: C*h*w (depthwise) + C*E (projection); conv1x1: C*r (1x1 conv) + r*h*w*E (projection); equal at
    r = C*(h*w + E) / (C + h*w*E): S0 (C=1024) 22 -> 24, S1 (1280) 27 -> 24, S2-S4 (2048) 42 -> 40.
    """
    hw = feat_size[0] * feat_size[1]
    r = in_features * (hw + embed_dim) / (in_features + hw * embed_dim)
    return max(8, int(round(r / 8)) * 8)


class Conv1x1Head(_EmbeddingHead):
    """The seed's literal head: a 1x1 conv reducing the final map's channels + BN2d, flattened into the linear
    embedding layer, then BatchNorm1d (ArcFace's output layer "E" with a 1x1 reduction in front).

    The 1x1 conv has no activation, like the GDC conv: the embedding stays a linear function of the final map,
    and both BNs fold into the convs. `conv_pw` names the conv, so a GDC checkpoint fails to load here by name.
    """
    conv_name = 'conv_pw'

    def __init__(
            self,
            in_features: int,
            embed_dim: int = 512,
            num_classes: int = 0,
            feat_size: Tuple[int, int] = (7, 7),
            img_size: Tuple[int, int] = (112, 112),
            drop_rate: float = 0.,
            inference_mode: bool = False,
            head_chs: Optional[int] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_features: Channels of the final feature map.
            embed_dim: Embedding size.
            num_classes: Classifier outputs after the embedding (0: none).
            feat_size: Final feature map size (flattened into the projection).
            img_size: Input size the model was built for (for error messages).
            drop_rate: Dropout before the classifier.
            inference_mode: Build the fused layout.
            head_chs: Channels of the 1x1 reduction (default: `default_head_chs`, the GDC head's budget).
        """
        dd = {'device': device, 'dtype': dtype}
        head_chs = head_chs or default_head_chs(in_features, tuple(feat_size), embed_dim)
        if inference_mode:
            conv = nn.Conv2d(in_features, head_chs, 1, bias=True, **dd)
        else:
            conv = ConvNormAct(in_features, head_chs, 1, apply_act=False, **dd)
        super().__init__(conv, head_chs * feat_size[0] * feat_size[1], in_features, embed_dim, num_classes,
                         feat_size, img_size, drop_rate, inference_mode, **dd)
        self.head_chs = head_chs

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(x)


HEAD_TYPES = {'gdc': GDCHead, 'conv1x1': Conv1x1Head}


def reset_face_classifier(model: nn.Module, num_classes: int, global_pool: Optional[str] = None) -> None:
    """`reset_classifier` of the face models (MobileOne112, MobileFaceNet), with timm's meaning: `global_pool=None`
    (or the current one) keeps the head and replaces its classifier, so the GDC head's embedding is unchanged; another
    `global_pool` builds that head (`model._create_head`). `model.head_hidden_size` follows the head."""
    check_num_classes(num_classes)
    dd = get_device_dtype(model.stages)
    if global_pool is None or global_pool == model.global_pool:
        if isinstance(model.head, _EmbeddingHead):
            model.head.reset(num_classes)
        else:
            model.head.reset(num_classes, in_features=model.num_features, **dd)
    else:
        check_global_pool(global_pool)
        model.global_pool = global_pool
        model.head = model._create_head(num_classes, global_pool, **dd)
        model.head.train(model.training)
    model.num_classes = num_classes
    model.head_hidden_size = model.head.num_features


def infer_model_args(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """Head arguments a mobileone_112 state dict was built with (embed_dim, num_classes, global_pool)."""
    args: Dict[str, Any] = {}
    if 'head.proj.weight' in state_dict:
        args['embed_dim'] = state_dict['head.proj.weight'].shape[0]
    elif 'head.fc.weight' in state_dict:
        args['global_pool'] = 'avg'
    fc = state_dict.get('head.fc.weight')
    args['num_classes'] = fc.shape[0] if fc is not None else 0
    return args
