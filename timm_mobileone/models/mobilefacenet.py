""" MobileFaceNet as insightface trained it, loading insightface's MXNet checkpoints

`MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on Mobile Devices`
    - https://arxiv.org/abs/1804.07573
Origin: deepinsight/insightface (MIT code; its pretrained models are for non-commercial research only),
`recognition/.../symbol/fmobilefacenet.py` with `symbol_utils.get_fc1(..., 'GDC')`: the graph of the legacy model
zoo's MobileFaceNet ("model-y1-test2", ArcFace on MS1M-refine-v1, LFW 0.9950).

The layout, in insightface's layer names (which the checkpoint keys carry):
    conv_1 (3x3/2, 64) -> conv_2_dw (3x3 depthwise, 64)
    -> dconv_23 + res_3 x4 (bottlenecks 64 -> 128 -> 64) -> dconv_34 + res_4 x6 (128, expansion 256)
    -> dconv_45 + res_5 x2 (128; the downsampling one expands to 512) -> conv_6sep (1x1, 512)
    -> GDC head: conv_6dw7_7 (7x7 depthwise) + BN, pre_fc1 (linear, bias) -> fc1 (BatchNorm1d, fixed gamma)
Each conv is followed by BatchNorm and (except the projections and the GDC) PReLU. MXNet's BatchNorm eps is 1e-3
(2e-5 for fc1), not PyTorch's 1e-5: the port sets them, since eps is not in the checkpoint. The MXNet graph
normalizes its 0..255 RGB input as (x - 127.5) * 0.0078125 = (x/255 - 0.5) / (128/255): that is this cfg's mean and
std. `timm_mobileone.deploy.peers` uses this model as the MobileFaceNet reference of the zoo and deploy tables.

The embedding head is the project's `GDCHead` (`heads.py`, the same head MobileOne-112 uses): `pre_fc1`'s bias is
folded into fc1's running mean on loading (BN(Wx + b) with mean m equals BN(Wx) with mean m - b), so the head is the
same modules and folds the same way. `reparameterize()` (or `timm.utils.reparameterize_model`) folds every BatchNorm
into its conv or linear layer; `inference_mode=True` builds that fused layout, for fused checkpoints.

Hacked together by the timm-mobileone contributors.
"""
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # private helper (timm>=1.0.31), also in mobileone_112.py

from ..hub_files import MOBILEFACENET_WEIGHTS_ADVICE
from .heads import GDC_POOL, GDCHead, check_global_pool, check_num_classes, feat_size_for, reset_face_classifier
from .loading import require_weights, upstream_checkpoint_hook

__all__ = ['ConvBnPReLU', 'Bottleneck', 'MobileFaceNet']

MXNET_BN_EPS = 1e-3  # MXNet's BatchNorm default
MXNET_FC1_EPS = 2e-5  # insightface's get_fc1 sets it for the embedding BN
# (x/255 - mean) / std == (x - 127.5) * 0.0078125, what the MXNet graph computes on 0..255 input
INSIGHTFACE_MEAN = (0.5, 0.5, 0.5)
INSIGHTFACE_STD = (128 / 255, 128 / 255, 128 / 255)
# (out_chs, channels inside the downsampling bottleneck, channels inside the residual ones, residual count)
Y1_STAGES = ((64, 128, 128, 4), (128, 256, 256, 6), (128, 512, 256, 2))


class ConvBnPReLU(nn.Module):
    """Conv (no bias) + BatchNorm + optional per-channel PReLU; fused: conv with bias + PReLU."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            groups: int = 1,
            act: bool = True,
            bn_eps: float = MXNET_BN_EPS,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            kernel_size: Square kernel size ('same' padding for odd sizes).
            stride: Stride.
            groups: Conv groups (in_chs for depthwise).
            act: Follow with PReLU.
            bn_eps: BatchNorm epsilon (MXNet's default 1e-3).
            inference_mode: Build the fused layout (conv with bias, no BN).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                              bias=inference_mode, **dd)
        self.bn = nn.Identity() if inference_mode else nn.BatchNorm2d(out_chs, eps=bn_eps, **dd)
        self.act = nn.PReLU(out_chs, **dd) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        conv, bn = self.conv, self.bn
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          groups=conv.groups, bias=True, **get_device_dtype(conv))
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.conv = fused
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """insightface's `Residual` unit (stride 1, same channels: identity added) or `DResidual` (no shortcut):
    1x1 expansion + PReLU, 3x3 depthwise + PReLU, linear 1x1 projection."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            mid_chs: int,
            stride: int = 1,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            mid_chs: Channels of the expansion and the depthwise conv.
            stride: Stride of the depthwise conv.
            inference_mode: Build the fused layout.
        """
        super().__init__()
        kw = dict(inference_mode=inference_mode, device=device, dtype=dtype)
        self.conv_sep = ConvBnPReLU(in_chs, mid_chs, 1, **kw)
        self.conv_dw = ConvBnPReLU(mid_chs, mid_chs, 3, stride, groups=mid_chs, **kw)
        self.conv_proj = ConvBnPReLU(mid_chs, out_chs, 1, act=False, **kw)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_proj(self.conv_dw(self.conv_sep(x)))
        return x + shortcut if self.has_skip else x


class MobileFaceNet(nn.Module):
    """MobileFaceNet with insightface's layer layout and a GDC embedding head (default 128-d)."""

    # what its fused ONNX graph may hold (timm_mobileone.export checks it): residual adds and PReLU, no BatchNorm
    deploy_onnx_ops = frozenset({'Conv', 'PRelu', 'Add', 'Flatten', 'Reshape', 'Gemm', 'MatMul'})

    def __init__(
            self,
            stages: Tuple[Tuple[int, int, int, int], ...] = Y1_STAGES,
            stem_chs: int = 64,
            num_features: int = 512,
            embed_dim: int = 128,
            num_classes: int = 0,
            global_pool: str = GDC_POOL,
            in_chans: int = 3,
            img_size: Union[int, Tuple[int, int]] = 112,
            drop_rate: float = 0.,
            inference_mode: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            stages: (out_chs, downsampling mid_chs, residual mid_chs, residual count) per stage.
            stem_chs: Channels of the two stem convs.
            num_features: Channels of the final 1x1 conv (what the GDC head reduces).
            embed_dim: Embedding size.
            num_classes: Classifier outputs after the embedding (0: the embedding is the output).
            global_pool: 'gdc' (the GDC embedding head), a timm pool type ('avg', ...: timm's ClassifierHead on the
                final map) or '' (no pooling: the 4-D final map), as MobileOne-112 takes it.
            in_chans: Input channels.
            img_size: Input size; the GDC kernel covers the final map (7x7 at 112).
            drop_rate: Dropout before the classifier.
            inference_mode: Build the fused (BN-folded) layout.
        """
        super().__init__()
        kw = dict(inference_mode=inference_mode, device=device, dtype=dtype)
        check_num_classes(num_classes)
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.feat_size = feat_size_for(self.img_size)
        self.drop_rate = drop_rate
        self.inference_mode = inference_mode
        self.grad_checkpointing = False
        self.stage_cfg = tuple(tuple(s) for s in stages)
        self.stem = nn.Sequential(
            ConvBnPReLU(in_chans, stem_chs, 3, 2, **kw),
            ConvBnPReLU(stem_chs, stem_chs, 3, 1, groups=stem_chs, **kw),
        )
        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module='stem.1')]
        in_chs, reduction, blocks = stem_chs, 2, []
        for i, (out_chs, down_mid, mid, repeats) in enumerate(stages):
            layers = [Bottleneck(in_chs, out_chs, down_mid, 2, **kw)]
            layers += [Bottleneck(out_chs, out_chs, mid, 1, **kw) for _ in range(repeats)]
            blocks.append(nn.Sequential(*layers))
            in_chs, reduction = out_chs, reduction * 2
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*blocks)
        self.final_conv = ConvBnPReLU(in_chs, num_features, 1, **kw)
        self.feature_info.append(dict(num_chs=num_features, reduction=reduction, module='final_conv'))
        self.num_features = num_features
        self.head = self._create_head(num_classes, global_pool, device=device, dtype=dtype)
        self.head_hidden_size = self.head.num_features
        self._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)

    def _create_head(self, num_classes: int, global_pool: str, device=None, dtype=None) -> nn.Module:
        if global_pool != GDC_POOL:
            return ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate,
                                  device=device, dtype=dtype)
        head = GDCHead(self.num_features, self.embed_dim, num_classes, feat_size=self.feat_size,
                       img_size=self.img_size, drop_rate=self.drop_rate, inference_mode=self.inference_mode,
                       device=device, dtype=dtype)
        if not self.inference_mode:  # MXNet's eps (not in the checkpoint)
            head.conv_dw.bn.eps = MXNET_BN_EPS
            head.norm.eps = MXNET_FC1_EPS
        return head

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [(r'^stages\.(\d+)\.(\d+)', None),
                                                      (r'^final_conv', (99998,)), (r'^head', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (0: none); None or 'gdc' keeps the GDC head (and its embedding), another
        `global_pool` replaces the head as MobileOne-112's does ('' : no pooling, 4-D output)."""
        reset_face_classifier(self, num_classes, global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features, returning the outputs of the stem and stages named by `indices` too.

        Args:
            x: Input images.
            indices: Take the last n of (stem, stage 1, 2, 3, final conv) if int, all if None, the listed ones if
                a sequence: `feature_info`'s five levels.
            norm: Unused (no final norm).
            stop_early: Stop after the last one taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i + 1 in take_indices:
                intermediates.append(x)
        if len(stages) == len(self.stages):
            x = self.final_conv(x)
            if len(self.stages) + 1 in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_conv(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """Fold every BatchNorm in place (as `timm.utils.reparameterize_model(model, inplace=True)`)."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, 'reparameterize'):
                module.reparameterize()
        self.inference_mode = True

    @torch.jit.ignore
    def equalization_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(layer, next layer) pairs with only a PReLU (or nothing) between them and no other consumer of the first's
        output, for cross-layer equalization (`timm_mobileone.deploy.quant.equalize`) of the fused model."""
        convs = [self.stem[0].conv, self.stem[1].conv]
        pairs = [(convs[0], convs[1]), (convs[1], self.stages[0][0].conv_sep.conv)]
        for stage in self.stages:
            for block in stage:
                pairs += [(block.conv_sep.conv, block.conv_dw.conv), (block.conv_dw.conv, block.conv_proj.conv)]
        if isinstance(self.head, GDCHead):  # another global_pool's head has no conv to pair
            pairs += [(self.final_conv.conv, self.head.conv_dw), (self.head.conv_dw, self.head.proj)]
        return pairs


# MXNet layer names -> module paths (insightface's fmobilefacenet naming)
def _mxnet_module_names(stages: Tuple[Tuple[int, int, int, int], ...] = Y1_STAGES) -> Dict[str, str]:
    names = {'conv_1': 'stem.0', 'conv_2_dw': 'stem.1', 'conv_6sep': 'final_conv'}
    for i, (_, _, _, repeats) in enumerate(stages):
        down = f'dconv_{i + 2}{i + 3}'
        for part in ('sep', 'dw', 'proj'):
            names[f'{down}_conv_{part}'] = f'stages.{i}.0.conv_{part}'
            for j in range(repeats):
                names[f'res_{i + 3}_block{j}_conv_{part}'] = f'stages.{i}.{j + 1}.conv_{part}'
    return names


_MXNET_SUFFIXES = {
    '_conv2d_weight': '.conv.weight', '_batchnorm_gamma': '.bn.weight', '_batchnorm_beta': '.bn.bias',
    '_batchnorm_moving_mean': '.bn.running_mean', '_batchnorm_moving_var': '.bn.running_var',
    '_relu_gamma': '.act.weight',
}
_MXNET_HEAD = {
    'conv_6dw7_7_conv2d_weight': 'head.conv_dw.conv.weight', 'conv_6dw7_7_batchnorm_gamma': 'head.conv_dw.bn.weight',
    'conv_6dw7_7_batchnorm_beta': 'head.conv_dw.bn.bias', 'conv_6dw7_7_batchnorm_moving_mean':
        'head.conv_dw.bn.running_mean', 'conv_6dw7_7_batchnorm_moving_var': 'head.conv_dw.bn.running_var',
    'fc1_weight': 'head.proj.weight', 'fc1_beta': 'head.norm.bias', 'fc1_moving_var': 'head.norm.running_var',
}
# consumed while converting: the FC bias (folded into fc1's mean), fc1's mean, fc1's gamma (fix_gamma: 1)
_MXNET_FOLDED = ('pre_fc1_bias', 'fc1_moving_mean', 'fc1_gamma')


def _float_tensor(value: Any) -> torch.Tensor:
    """A float32 tensor of an MXNet array (numpy, as mxnet.read_params gives it, or already a tensor)."""
    return (value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))).float()


def is_mxnet_checkpoint(state_dict: Dict[str, Any]) -> bool:
    return 'conv_1_conv2d_weight' in state_dict or 'fc1_moving_var' in state_dict


def convert_mxnet(state_dict: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """insightface's MXNet arrays (by MXNet name) as this model's train-time state dict.

    Names the model lacks, and names it needs that the checkpoint lacks, raise KeyError naming them.
    """
    stages = getattr(model, 'stage_cfg', Y1_STAGES)
    modules = _mxnet_module_names(stages)
    pattern = re.compile(r'^(.*?)(' + '|'.join(map(re.escape, _MXNET_SUFFIXES)) + r')$')
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, value in state_dict.items():
        t = _float_tensor(value)
        if name in _MXNET_HEAD:
            out[_MXNET_HEAD[name]] = t
        elif name in _MXNET_FOLDED:
            continue
        else:
            m = pattern.match(name)
            if m and m.group(1) in modules:
                out[modules[m.group(1)] + _MXNET_SUFFIXES[m.group(2)]] = t
            else:
                unknown.append(name)
    missing = [n for n in _MXNET_FOLDED if n not in state_dict]
    if unknown or missing:
        raise KeyError('; '.join(filter(None, [
            f'layers the model lacks: {", ".join(unknown[:8])}{" ..." if len(unknown) > 8 else ""}' if unknown else '',
            f'missing: {", ".join(missing)}' if missing else ''])))
    bias, mean = _float_tensor(state_dict['pre_fc1_bias']), _float_tensor(state_dict['fc1_moving_mean'])
    out['head.norm.running_mean'] = mean - bias
    out['head.norm.weight'] = torch.ones_like(mean)  # fix_gamma=True: MXNet ignores the stored gamma
    return out


# MXNet names load through load_state_dict() too (the project's CLIs, a safetensors file of raw MXNet arrays)
_load_state_dict_pre_hook = upstream_checkpoint_hook(is_mxnet_checkpoint, convert_mxnet)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """insightface's MXNet names to this model's keys; other state dicts pass unchanged."""
    return convert_mxnet(state_dict, model) if is_mxnet_checkpoint(state_dict) else state_dict


def _create_mobilefacenet(variant: str, pretrained: bool = False, **kwargs) -> MobileFaceNet:
    require_weights(variant, pretrained, kwargs, MOBILEFACENET_WEIGHTS_ADVICE)
    return build_model_with_cfg(
        MobileFaceNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'num_classes': 0, 'input_size': (3, 112, 112), 'pool_size': (7, 7), 'fixed_input_size': True, 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': INSIGHTFACE_MEAN, 'std': INSIGHTFACE_STD,
        'first_conv': 'stem.0.conv', 'classifier': None, 'paper_ids': 'arXiv:1804.07573',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # insightface's weights are not hosted by this project (their licence is non-commercial research only): load
    # the MXNet file with --checkpoint model-0000.params in the CLIs, or convert it (python -m
    # timm_mobileone.mxnet) and pass checkpoint_path= / pretrained_cfg_overlay=dict(file=...)
    'mobilefacenet.insightface_ms1m_y1': _cfg(
        license='other', origin_url='https://github.com/deepinsight/insightface',
        notes=('insightface model zoo "MobileFaceNet (model-y1-test2)", ArcFace on MS1M-refine-v1, 128-d; '
               'non-commercial research use only; weights not hosted here: load the MXNet .params file',)),
})


@register_model
def mobilefacenet(pretrained: bool = False, **kwargs) -> MobileFaceNet:
    """MobileFaceNet, insightface's layout (blocks 4/6/2, GDC head, 128-d), ~0.99M params, 0.22 GMACs."""
    return _create_mobilefacenet('mobilefacenet', pretrained, **kwargs)


def check_mxnet_symbol(nodes: Dict[str, Dict[str, Any]], model: MobileFaceNet, source: str = 'symbol') -> None:
    """Raise MXNetError unless the MXNet graph (`mxnet.read_symbol`) is this model: every conv's geometry, BN eps,
    PReLU placement, residual adds, the GDC head, the embedding size and the input normalization of the cfg."""
    from ..mxnet import MXNetError, parse_tuple

    def fail(what: str) -> None:
        raise MXNetError(f'{source}: not the graph of this mobilefacenet: {what}')

    def node(name: str, op: str) -> Dict[str, Any]:
        n = nodes.get(name)
        if n is None or n['op'] != op:
            fail(f'no {op} node {name!r}')
        return n

    def check_conv(name: str, conv: nn.Conv2d) -> None:
        a = node(name, 'Convolution')['attrs']
        got = (parse_tuple(a.get('kernel', '')), parse_tuple(a.get('stride', '(1, 1)')),
               parse_tuple(a.get('pad', '(0, 0)')), int(a.get('num_group', 1)), int(a.get('num_filter', -1)))
        want = (conv.kernel_size, conv.stride, conv.padding, conv.groups, conv.out_channels)
        if got != want:
            fail(f'{name} is kernel/stride/pad/groups/filters {got}, the model has {want}')

    def check_bn(name: str, eps: float, fix_gamma: bool = False) -> None:
        a = node(name, 'BatchNorm')['attrs']
        if abs(float(a.get('eps', MXNET_BN_EPS)) - eps) > 1e-12 or (a.get('fix_gamma', 'True') == 'True') != fix_gamma:
            fail(f'{name} has eps {a.get("eps", MXNET_BN_EPS)} fix_gamma {a.get("fix_gamma", "True")}, the port '
                 f'expects eps {eps:g} fix_gamma {fix_gamma}')

    modules = _mxnet_module_names(model.stage_cfg)
    for mx_name, path in modules.items():
        block = model.get_submodule(path)
        check_conv(f'{mx_name}_conv2d', block.conv)
        check_bn(f'{mx_name}_batchnorm', MXNET_BN_EPS)
        has_act = f'{mx_name}_relu' in nodes
        if has_act != isinstance(block.act, nn.PReLU) or \
                (has_act and node(f'{mx_name}_relu', 'LeakyReLU')['attrs'].get('act_type') != 'prelu'):
            fail(f'{mx_name}: activation {"prelu" if isinstance(block.act, nn.PReLU) else "none"} expected')
    check_conv('conv_6dw7_7_conv2d', model.head.conv_dw.conv)
    check_bn('conv_6dw7_7_batchnorm', MXNET_BN_EPS)
    if int(node('pre_fc1', 'FullyConnected')['attrs'].get('num_hidden', -1)) != model.embed_dim:
        fail(f'pre_fc1 is not {model.embed_dim}-d')
    check_bn('fc1', MXNET_FC1_EPS, fix_gamma=True)
    convs = {n for n, v in nodes.items() if v['op'] == 'Convolution'}
    extra = sorted(convs - {f'{m}_conv2d' for m in modules} - {'conv_6dw7_7_conv2d'})
    if extra:
        fail(f'layers the port lacks: {", ".join(extra[:5])}')
    adds = sum(v['op'] in ('elemwise_add', '_Plus', 'broadcast_add') for v in nodes.values())
    want_adds = sum(b.has_skip for s in model.stages for b in s)
    if adds != want_adds:
        fail(f'{adds} residual adds, the model has {want_adds}')
    sub = [float(v['attrs'].get('scalar', 'nan')) for v in nodes.values() if v['op'] == '_minus_scalar']
    mul = [float(v['attrs'].get('scalar', 'nan')) for v in nodes.values() if v['op'] == '_mul_scalar']
    mean, std = model.pretrained_cfg.get('mean', INSIGHTFACE_MEAN), model.pretrained_cfg.get('std', INSIGHTFACE_STD)
    if sub != [127.5] or mul != [0.0078125] or any(abs(m * 255 - 127.5) > 1e-6 for m in mean) or \
            any(abs(s * 255 - 128) > 1e-4 for s in std):
        fail(f'its input normalization (x - {sub}) * {mul} is not the cfg\'s mean {mean} / std {std} '
             f'(insightface: (x - 127.5) * 0.0078125)')
