"""timm-mobileone: MobileOne backbones for 112x112 face recognition, registered with timm on import.

    import timm, timm_mobileone
    model = timm.create_model('mobileone_112_s1')                        # train-time (multi-branch) form
    fused = timm.create_model('mobileone_112_s1', inference_mode=True)   # fused layout, for fused checkpoints
    timm.utils.reparameterize_model(model)                               # train-time -> fused, same function
"""


def _quiet_interrupt_while_starting() -> None:
    """Ctrl-C while one of the project's commands starts (importing torch takes seconds) ends it as Ctrl-C later
    does (`cli.cli`): `error: interrupted` and exit code 130, not a traceback and a death by signal. Only where the
    program is such a command (`python -m eval.*`, `train.*`, `timm_mobileone.*`, `tests.timm_conformance`: each a
    `cli.cli` main) and SIGINT has Python's own handler: importing the package as a library changes nothing.
    `cli.cli` puts Python's handler back when the command's `main` starts, so its KeyboardInterrupt handling (resume
    advice) applies."""
    import os
    import signal
    import sys
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    if spec is None or spec.name.split('.')[0] not in ('eval', 'train', 'timm_mobileone', 'tests'):
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def interrupted(signum, frame):
        sys.stderr.write('error: interrupted\n')
        sys.stderr.flush()
        os._exit(130)  # mid-import: nothing written yet, and a half-imported torch should not run its exit hooks

    interrupted.starting = True
    try:
        signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread
        pass


_quiet_interrupt_while_starting()

from .models import GDCHead, MobileFaceNet, MobileOne112, MobileOneBlock, checkpoint_filter_fn, feat_size_for

__version__ = '0.1.0'
__all__ = ['GDCHead', 'MobileFaceNet', 'MobileOne112', 'MobileOneBlock', 'checkpoint_filter_fn', 'feat_size_for',
           '__version__']
