"""The model families, registered with timm on import: MobileOne-112 (`mobileone_112_s0`..`s4`, and the tiny
`mobileone_112_test` for tests and smoke runs), its DBB counterpart (`mobileone_112_dbb_s0`..`s4`,
`mobileone_112_dbb_test`), and the MobileFaceNet port (`mobilefacenet`). `merged` holds MobileOne's merged training
form; `dbb` the Diverse Branch Block."""
from .mobileone_112 import GDCHead, MobileOne112, MobileOneBlock, checkpoint_filter_fn, feat_size_for
from .mobilefacenet import MobileFaceNet

__all__ = ['GDCHead', 'MobileFaceNet', 'MobileOne112', 'MobileOneBlock', 'checkpoint_filter_fn', 'feat_size_for']
