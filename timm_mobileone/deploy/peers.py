"""Reference models the zoo report and the deploy table compare against at 112x112.

MobileFaceNet is this project's port of insightface's (`models/mobilefacenet.py`: the layout of Table 1 of
`MobileFaceNets`, https://arxiv.org/abs/1804.07573, as insightface trained it, and the model its trained MXNet
weights load into): PReLU, inverted residual bottlenecks, a GDC head and a 128-d embedding, 0.99M params, about
0.22 GMACs. The timm peers are built by name; those with train-time branches are reparameterized for their fused
rows.
"""
from typing import Callable, Dict

import torch.nn as nn

__all__ = ['PEERS', 'create_peer']


def _timm_peer(name: str) -> Callable[[], nn.Module]:
    def create() -> nn.Module:
        import timm
        return timm.create_model(name, num_classes=0)  # mobilefacenet: registered by the package's import
    return create


PEERS: Dict[str, Callable[[], nn.Module]] = {
    'mobilefacenet': _timm_peer('mobilefacenet'),
    'mobilenetv3_large_100': _timm_peer('mobilenetv3_large_100'),
    'mobilenetv2_100': _timm_peer('mobilenetv2_100'),
    'repvit_m0_9': _timm_peer('repvit_m0_9'),
    'fastvit_t8': _timm_peer('fastvit_t8'),
}


def create_peer(name: str) -> nn.Module:
    return PEERS[name]()
