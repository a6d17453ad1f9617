""" Diverse Branch Block (DBB), as a drop-in for MobileOne's block

`Diverse Branch Block: Building a Convolution as an Inception-like Unit` - https://arxiv.org/abs/2103.13425
Reference implementation: https://github.com/DingXiaoH/DiverseBranchBlock (Apache-2.0), `diversebranchblock.py` and
`dbb_transforms.py`. Written anew here; the branch set, the submodule names (`dbb_origin`, `dbb_1x1`, `dbb_avg`,
`dbb_1x1_kxk`, so that the reference's checkpoints map key for key) and the behaviours the paper leaves implicit
follow the reference, as noted where they occur.

Train-time, one conv of kernel k, stride s, groups g becomes the sum of (paper Fig. 2):
* `dbb_origin`: the kxk conv + BN;
* `dbb_1x1`: a 1x1 conv (stride s) + BN. Not for depthwise convs (g == out channels), as in the reference;
* `dbb_avg`: a 1x1 conv + BN, then kxk average pooling (stride s) + BN. For depthwise convs the reference drops the
  1x1 conv and its BN and pools the input directly (zero padding counted in the average);
* `dbb_1x1_kxk`: a 1x1 conv + BN, then the kxk conv (stride s) + BN. Its width is the input's (the 1x1 conv is then
  identity-initialised: `IdentityBasedConv1x1`), or twice the input's for depthwise convs ("for mobilenet, it is
  better to have 2X internal channels", reference).
For k = 1 the branches that only exist to give a kxk conv a 1x1 or pooled partner (`dbb_1x1`, `dbb_avg`, which
would duplicate `dbb_origin`) drop out, and the block keeps `dbb_origin` and the 1x1 -> 1x1 `dbb_1x1_kxk`.

After `reparameterize()` the block is exactly a fused `MobileOneBlock`: `reparam_conv` (registered after `attn` and
`act`), optional SE, ReLU; same keys, shapes and conv geometry, so a fused DBB network is a fused MobileOne network.
No MobileOne scale or BN-skip branches: a DBB network is a MobileNet whose convs are DBBs.

The DBB family `mobileone_112_dbb_s0..s4` (and the tiny `mobileone_112_dbb_test`) is registered here: MobileOne-112's
macro-architecture (widths, depths, strides, SE, head, cfgs; `mobileone_112.py` builds it) with every conv a DBB.
Fused, each is exactly the fused `mobileone_112_sN` network (same modules, keys and shapes). timm's registry lists
the family under this module's name: `timm.list_models(module='dbb')`.
"""
from dataclasses import replace
from functools import partial
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import ConvNormAct, create_conv2d, get_device_dtype
from timm.models import generate_default_cfgs, register_model
from timm.models.byobnet import ByoModelCfg, LayerFn, num_groups

from .merged import check_train_form
from .mobileone_112 import MobileOne112, _cfg as _mobileone_112_cfg, _create_mobileone_112
from .mobileone_112 import model_cfgs as _mobileone_112_model_cfgs

__all__ = ['DBBBlock', 'BNAndPad', 'IdentityBasedConv1x1', 'check_dbb_train_form']


class IdentityBasedConv1x1(nn.Module):
    """A 1x1 conv whose kernel is `weight + identity`, `weight` starting at zero (reference: IdentityBasedConv1x1).

    The identity is a non-persistent buffer: it follows `.to()` and stays out of the state dict.
    """

    def __init__(self, channels: int, groups: int = 1, device=None, dtype=None) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(channels, channels // groups, 1, 1, device=device, dtype=dtype))
        ident = torch.zeros(channels, channels // groups, 1, 1, device=device, dtype=dtype)
        idx = torch.arange(channels)
        ident[idx, idx % (channels // groups)] = 1.0
        self.register_buffer('id_tensor', ident, persistent=False)

    def kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), None, 1, 0, 1, self.groups)


class BNAndPad(nn.Module):
    """BatchNorm2d, then a border of `pad` pixels holding what the BN outputs for a zero input.

    A kxk conv after a bias-free 1x1 conv + BN sees, in the merged single conv, a zero-padded input whose 1x1 + BN
    image is this value, not zero: padding here, with the kxk conv unpadded, makes the branch equal its fusion.
    As in the reference (BNAndPadLayer), the value comes from the running statistics and detached affine
    parameters, also in train mode.
    """

    def __init__(self, num_features: int, pad: int, device=None, dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, device=device, dtype=dtype)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        if self.pad > 0:
            bn = self.bn
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            value = (bn.bias.detach() - bn.running_mean * scale).view(1, -1, 1, 1)
            x = F.pad(x - value, [self.pad] * 4) + value
        return x


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """A conv kernel (no bias) followed by eval-mode BN -> kernel, bias (DBB transform I)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return kernel * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _merge_1x1_kxk(
        k1: torch.Tensor, b1: torch.Tensor, k2: torch.Tensor, b2: torch.Tensor, groups: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 1x1 conv (k1, b1) then a kxk conv (k2, b2), both with `groups`, as one kxk conv (DBB transform III).

    Per group: K[o, i] = sum_m k2[o, m] k1[m, i]; the 1x1 bias passes through the kxk kernel's sum.
    """
    mid, out = k1.shape[0], k2.shape[0]
    k1g = k1.reshape(groups, mid // groups, -1)  # (g, mid/g, in/g)
    k2g = k2.reshape(groups, out // groups, mid // groups, *k2.shape[-2:])  # (g, out/g, mid/g, k, k)
    kernel = torch.einsum('gomhw,gmi->goihw', k2g, k1g).reshape(out, k1g.shape[-1], *k2.shape[-2:])
    bias = b2 + torch.einsum('gomhw,gm->go', k2g, b1.reshape(groups, mid // groups)).reshape(out)
    return kernel, bias


def _avg_kernel(channels: int, kernel_size: int, groups: int, like: torch.Tensor) -> torch.Tensor:
    """kxk average pooling of each channel as a grouped conv kernel (DBB transform V)."""
    per_group = channels // groups
    k = torch.zeros(channels, per_group, kernel_size, kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels)
    k[idx, idx % per_group] = 1.0 / kernel_size ** 2
    return k


def check_dbb_train_form(train_form: str) -> str:
    """'branches', or a ValueError: a DBB block has no exact merged training form (`timm_mobileone.models.merged`).

    Its 1x1-kxk branch (and, on dense convs, the average branch) pads its inner BN's output with the value the BN
    gives a zero input under the running statistics (`BNAndPad`, as the reference does), while the inside of the
    map is normalized with the batch's: the border of that branch is not a per-channel affine map of one linear
    function of the input, which is what a single merged conv with a bias computes. Merging would change the
    function; it is refused rather than approximated.
    """
    if check_train_form(train_form) == 'merged':
        raise ValueError("train_form='merged' is not exact for DBB blocks: the 1x1-kxk branch pads its inner "
                         "BatchNorm's output with running-statistics values while the batch statistics normalize "
                         "the rest, which one merged conv cannot reproduce; use train_form='branches'")
    return train_form


class DBBBlock(nn.Module):
    """A conv of kernel k as a Diverse Branch Block, then optional attention (SE) and activation.

    Built with the same arguments as timm's `MobileOneBlock` (it is created by the same ByobNet stage builder), so
    `mobileone_112_dbb_sN` differ from `mobileone_112_sN` in the training-time block alone.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            dilation: Tuple[int, int] = (1, 1),
            group_size: Optional[int] = None,
            inference_mode: bool = False,
            internal_chs: Optional[int] = None,
            layers: Optional[LayerFn] = None,
            drop_path_rate: float = 0.,
            train_form: str = 'branches',
            device=None,
            dtype=None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            in_chs: Input channels.
            out_chs: Output channels.
            kernel_size: Kernel size k of the conv.
            stride: Stride.
            dilation: Only (1, 1) (as the reference asserts padding k // 2).
            group_size: Channels per group (None: a dense conv; 1: depthwise).
            inference_mode: Build the fused single-conv layout (a fused MobileOneBlock's).
            internal_chs: Width of the 1x1 -> kxk branch (default: the input's, twice it for depthwise convs).
            layers: ByobNet layer functions (norm_act, act, attn).
            drop_path_rate: Unused: stochastic depth needs a skip connection, which a DBB network has not.
            train_form: Only 'branches' (`check_dbb_train_form` says why 'merged' is refused).
            **kwargs: Further ByobNet block arguments (bottle_ratio, downsample, drop_block,
                num_conv_branches), unused.
        """
        super().__init__()
        self.train_form = check_dbb_train_form(train_form)
        dd = {'device': device, 'dtype': dtype}
        if tuple(dilation) != (1, 1):
            raise ValueError(f'DBBBlock supports dilation (1, 1) only, got {dilation}')
        layers = layers or LayerFn()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size, self.stride = kernel_size, stride
        self.groups = groups = num_groups(group_size, in_chs)
        self.reparam_conv: Optional[nn.Module] = None
        depthwise = groups == out_chs and in_chs == out_chs
        if not inference_mode:
            pad = kernel_size // 2
            self.dbb_origin = ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, groups=groups,
                                          apply_act=False, **dd)
            self.dbb_1x1 = None
            self.dbb_avg = None
            if kernel_size > 1:
                if not depthwise:
                    self.dbb_1x1 = ConvNormAct(in_chs, out_chs, 1, stride=stride, groups=groups, apply_act=False,
                                               **dd)
                    self.dbb_avg = nn.Sequential()
                    self.dbb_avg.add_module('conv', nn.Conv2d(in_chs, out_chs, 1, groups=groups, bias=False, **dd))
                    self.dbb_avg.add_module('bn', BNAndPad(out_chs, pad, **dd))
                    self.dbb_avg.add_module('avg', nn.AvgPool2d(kernel_size, stride, 0))
                else:
                    self.dbb_avg = nn.Sequential()
                    self.dbb_avg.add_module('avg', nn.AvgPool2d(kernel_size, stride, pad))
                self.dbb_avg.add_module('avgbn', nn.BatchNorm2d(out_chs, **dd))
            mid = internal_chs or (2 * in_chs if depthwise else in_chs)
            if mid % groups:
                raise ValueError(f'internal_chs={mid} is not divisible by groups={groups}')
            self.dbb_1x1_kxk = nn.Sequential()
            if mid == in_chs:
                self.dbb_1x1_kxk.add_module('idconv1', IdentityBasedConv1x1(in_chs, groups, **dd))
            else:
                self.dbb_1x1_kxk.add_module('conv1', nn.Conv2d(in_chs, mid, 1, groups=groups, bias=False, **dd))
            self.dbb_1x1_kxk.add_module('bn1', BNAndPad(mid, pad, **dd))
            self.dbb_1x1_kxk.add_module(
                'conv2', nn.Conv2d(mid, out_chs, kernel_size, stride, 0, groups=groups, bias=False, **dd))
            self.dbb_1x1_kxk.add_module('bn2', nn.BatchNorm2d(out_chs, **dd))
        self.attn = nn.Identity() if layers.attn is None else layers.attn(out_chs, **dd)
        self.act = layers.act(inplace=True)
        if inference_mode:
            self.reparam_conv = self._fused_conv(**dd)

    # what `MobileOne112.set_train_form` asks every block before it switches any
    check_train_form = staticmethod(check_dbb_train_form)

    def _fused_conv(self, device=None, dtype=None) -> nn.Module:
        # the padding rule of MobileOne's fused conv (create_conv2d), so the two fused networks are one
        return create_conv2d(self.in_chs, self.out_chs, self.kernel_size, stride=self.stride, groups=self.groups,
                             bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.attn(self.reparam_conv(x)))
        out = self.dbb_origin(x) + self.dbb_1x1_kxk(x)
        if self.dbb_1x1 is not None:
            out = out + self.dbb_1x1(x)
        if self.dbb_avg is not None:
            out = out + self.dbb_avg(x)
        return self.act(self.attn(out))

    @torch.no_grad()
    def get_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The single kxk conv (kernel, bias) that the branches sum to, with eval-mode BN statistics."""
        k, groups = self.kernel_size, self.groups
        kernel, bias = _fuse_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)

        first = self.dbb_1x1_kxk[0]
        k1 = first.kernel() if isinstance(first, IdentityBasedConv1x1) else first.weight
        k1, b1 = _fuse_bn(k1, self.dbb_1x1_kxk.bn1.bn)
        k2, b2 = _fuse_bn(self.dbb_1x1_kxk.conv2.weight, self.dbb_1x1_kxk.bn2)
        kk, bb = _merge_1x1_kxk(k1, b1, k2, b2, groups)
        kernel, bias = kernel + kk, bias + bb

        if self.dbb_1x1 is not None:
            k11, b11 = _fuse_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            kernel, bias = kernel + F.pad(k11, [k // 2] * 4), bias + b11  # transform VI: 1x1 centred in kxk

        if self.dbb_avg is not None:
            ka, ba = _fuse_bn(_avg_kernel(self.out_chs, k, groups, kernel), self.dbb_avg.avgbn)
            if hasattr(self.dbb_avg, 'conv'):
                kc, bc = _fuse_bn(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
                ka, ba = _merge_1x1_kxk(kc, bc, ka, ba, groups)
            kernel, bias = kernel + ka, bias + ba
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse every branch and BN into `reparam_conv` in place (a no-op once fused)."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.get_kernel_bias()
        conv = self._fused_conv(**get_device_dtype(self.dbb_origin.conv))
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        for name in ('dbb_origin', 'dbb_1x1', 'dbb_avg', 'dbb_1x1_kxk'):
            if hasattr(self, name):
                delattr(self, name)
        self.reparam_conv = conv


# ----------------------------------------------------------------------------------------------------------------
# The DBB family: MobileOne-112's architectures with every block a DBBBlock, built by MobileOne-112's `_create`


def _dbb_model_cfg(cfg: ByoModelCfg) -> ByoModelCfg:
    """A MobileOne-112 architecture with every block (the stem's too: it is built of the stages' block type) a
    DBBBlock, which ignores num_conv_branches."""
    return replace(cfg, blocks=tuple(tuple(replace(b, type=partial(DBBBlock)) for b in s) for s in cfg.blocks))


model_cfgs = {
    name.replace('mobileone_112_', 'mobileone_112_dbb_'): _dbb_model_cfg(cfg)
    for name, cfg in _mobileone_112_model_cfgs.items()
}


def _create_dbb(variant: str, pretrained: bool = False, **kwargs) -> MobileOne112:
    return _create_mobileone_112(variant, pretrained, model_cfg=model_cfgs[variant], **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return _mobileone_112_cfg(
        license='apache-2.0',
        first_conv=('stem.dbb_origin.conv', 'stem.dbb_1x1.conv', 'stem.dbb_avg.conv'),
        paper_ids='arXiv:2206.04040, arXiv:2103.13425',
        origin_url='https://github.com/DingXiaoH/DiverseBranchBlock',
        notes=('MobileOne-SN macro-architecture for 112x112 faces with every conv a Diverse Branch Block; fuses to '
               'exactly the fused mobileone_112_sN network.',),
        **kwargs,
    )


# no weights exist for the family: `pretrained=True` names what does (hub_files.face_weights_advice)
default_cfgs = generate_default_cfgs(
    {f'mobileone_112_dbb_s{i}.untrained': _cfg() for i in range(5)} | {'mobileone_112_dbb_test.untrained': _cfg()})


@register_model
def mobileone_112_dbb_s0(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S0 layout with Diverse Branch Blocks (fuses to mobileone_112_s0), GDC embedding head."""
    return _create_dbb('mobileone_112_dbb_s0', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_dbb_s1(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S1 layout with Diverse Branch Blocks (fuses to mobileone_112_s1), GDC embedding head."""
    return _create_dbb('mobileone_112_dbb_s1', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_dbb_s2(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S2 layout with Diverse Branch Blocks (fuses to mobileone_112_s2), GDC embedding head."""
    return _create_dbb('mobileone_112_dbb_s2', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_dbb_s3(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S3 layout with Diverse Branch Blocks (fuses to mobileone_112_s3), GDC embedding head."""
    return _create_dbb('mobileone_112_dbb_s3', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_dbb_s4(pretrained: bool = False, **kwargs) -> MobileOne112:
    """MobileOne-S4 layout with Diverse Branch Blocks and SE (fuses to mobileone_112_s4), GDC embedding head."""
    return _create_dbb('mobileone_112_dbb_s4', pretrained=pretrained, **kwargs)


@register_model
def mobileone_112_dbb_test(pretrained: bool = False, **kwargs) -> MobileOne112:
    """`mobileone_112_test` with Diverse Branch Blocks: fuses to exactly the fused `mobileone_112_test` network."""
    return _create_dbb('mobileone_112_dbb_test', pretrained=pretrained, **kwargs)
