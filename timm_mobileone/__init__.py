"""timm-mobileone: MobileOne backbones for 112x112 face recognition, registered with timm on import.

    import timm, timm_mobileone
    model = timm.create_model('mobileone_112_s1')                        # train-time (multi-branch) form
    fused = timm.create_model('mobileone_112_s1', inference_mode=True)   # fused layout, for fused checkpoints
    timm.utils.reparameterize_model(model)                               # train-time -> fused, same function
"""
from .models import GDCHead, MobileFaceNet, MobileOne112, MobileOneBlock, checkpoint_filter_fn, feat_size_for

__version__ = '0.1.0'
__all__ = ['GDCHead', 'MobileFaceNet', 'MobileOne112', 'MobileOneBlock', 'checkpoint_filter_fn', 'feat_size_for',
           '__version__']
