"""The model families, registered with timm on import: MobileOne-112 (`mobileone_112`: `mobileone_112_s0`..`s4`, and
the tiny `mobileone_112_test` for tests and smoke runs), its DBB counterpart (`dbb`: `mobileone_112_dbb_s0`..`s4`,
`mobileone_112_dbb_test`, with the Diverse Branch Block), and the MobileFaceNet port (`mobilefacenet`). `heads` holds
the face embedding heads the families share; `merged` MobileOne's merged training form; `loading` what their
pretrained loads share."""
from .heads import GDCHead, feat_size_for
from .mobileone_112 import MobileOne112, MobileOneBlock, checkpoint_filter_fn
from . import dbb  # noqa: F401  (registers the DBB family)
from .mobilefacenet import MobileFaceNet

__all__ = ['GDCHead', 'MobileFaceNet', 'MobileOne112', 'MobileOneBlock', 'checkpoint_filter_fn', 'feat_size_for']
