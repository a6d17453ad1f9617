"""Reference models the zoo report compares against at 112x112.

MobileFaceNet is defined here (no package ships it): the layout of Table 1 of `MobileFaceNets: Efficient CNNs for
Accurate Real-Time Face Verification on Mobile Devices` (https://arxiv.org/abs/1804.07573), with PReLU, inverted
residual bottlenecks, a linear GDC (7x7 depthwise) and a 128-d linear embedding: 0.99M params, about 0.22 GMACs.
The timm peers are built by name; those with train-time branches are reparameterized for their fused rows.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn

__all__ = ['MobileFaceNet', 'PEERS', 'create_peer']


class _ConvBN(nn.Sequential):

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        layers = [nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2 if kernel_size in (1, 3)
                            else 0, groups=groups, bias=False), nn.BatchNorm2d(out_chs)]
        if act:
            layers.append(nn.PReLU(out_chs))
        super().__init__(*layers)


class _Bottleneck(nn.Module):

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = in_chs * expansion
        self.conv = nn.Sequential(
            _ConvBN(in_chs, mid, 1),
            _ConvBN(mid, mid, 3, stride, groups=mid),
            _ConvBN(mid, out_chs, 1, act=False),
        )
        self.residual = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet (paper layout), returning the (B, embed_dim) embedding of a 112x112 crop."""

    # (expansion t, channels c, repeats n, stride s) of Table 1
    SETTINGS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def __init__(self, embed_dim: int = 128) -> None:
        super().__init__()
        layers = [_ConvBN(3, 64, 3, 2), _ConvBN(64, 64, 3, 1, groups=64)]
        in_chs = 64
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_Bottleneck(in_chs, c, s if i == 0 else 1, t))
                in_chs = c
        layers += [_ConvBN(in_chs, 512, 1), _ConvBN(512, 512, 7, groups=512, act=False),
                   _ConvBN(512, embed_dim, 1, act=False)]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.pretrained_cfg = dict(input_size=(3, 112, 112), architecture='mobilefacenet')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.features(x))


def _timm_peer(name: str) -> Callable[[], nn.Module]:
    def create() -> nn.Module:
        import timm
        return timm.create_model(name, num_classes=0)
    return create


PEERS: Dict[str, Callable[[], nn.Module]] = {
    'mobilefacenet': MobileFaceNet,
    'mobilenetv3_large_100': _timm_peer('mobilenetv3_large_100'),
    'mobilenetv2_100': _timm_peer('mobilenetv2_100'),
    'repvit_m0_9': _timm_peer('repvit_m0_9'),
    'fastvit_t8': _timm_peer('fastvit_t8'),
}


def create_peer(name: str) -> nn.Module:
    return PEERS[name]()
