"""Verification data: packs found by name in a folder, and paths to `VerificationSet`s (insightface `.bin` packs,
aligned folders with pairs.txt; raw photo folders and CFP roots, aligned first). Part of eval's public API
(`eval.api`)."""
import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence, Union

from timm_mobileone.errors import UserError
from timm_mobileone.verification_data import VerificationSet, load_verification_set


def _align_flag_defaults():
    from .align import add_align_flags
    return add_align_flags(argparse.ArgumentParser(add_help=False)).parse_args([])


_FLAGS = _align_flag_defaults()  # eval.align's flags are the one home of these defaults


@dataclass(frozen=True)
class Alignment:
    """How raw photos are detected and aligned before they are embedded (eval.align's flags, same defaults):
    `detector` (a YuNet ONNX file), `score_threshold`, `select`, `min_side`, `max_side`, `fallback` ('center' or
    'none'), `jpeg_quality` of the cached crops; `workers` processes (--align-workers), the crop `cache` folder
    (--align-cache; '' = ~/.cache/timm-mobileone/aligned), `progress` bars. Nothing is checked until a photo needs
    aligning (`settings()`)."""
    detector: str = _FLAGS.detector
    score_threshold: float = _FLAGS.score_threshold
    select: str = _FLAGS.select
    min_side: int = _FLAGS.min_side
    max_side: int = _FLAGS.max_side
    fallback: str = _FLAGS.fallback
    jpeg_quality: int = _FLAGS.jpeg_quality
    workers: int = _FLAGS.align_workers
    cache: str = ''
    progress: bool = False

    def flags(self) -> SimpleNamespace:
        """The values under eval.align's flag names (what the photo readers take)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values['align_workers'] = values.pop('workers')
        values['align_cache'] = values.pop('cache')
        return SimpleNamespace(**values)

    def settings(self):
        """The `AlignSettings` these values ask for (the detector's hash included); UserError for impossible
        values."""
        from .align import align_settings
        return align_settings(self.flags())


def find_packs(data_dir: Union[str, Path], targets: Sequence[str]) -> List[Path]:
    """`data_dir/NAME.bin` for each target name found there; UserError where the folder or all of them are
    missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f'--data-dir {data_dir}: no such folder')
    paths = [data_dir / f'{t}.bin' for t in targets if (data_dir / f'{t}.bin').is_file()]
    if not paths:
        raise UserError(f'--data-dir {data_dir}: none of {", ".join(t + ".bin" for t in targets)} found')
    return paths


def load_datasets(paths: Sequence[Union[str, Path]], *, align: bool = False,
                  protocols: Optional[Sequence[str]] = None,
                  alignment: Optional[Alignment] = None) -> List[VerificationSet]:
    """The verification sets at `paths`, in order: an insightface `.bin` pack or a folder of aligned crops with
    pairs.txt each; with `align`, folders (or pairs.txt files) of raw photos, aligned first (once: the crops are
    cached). A CFP root (Protocol/Split/...) is always aligned and gives one set per protocol in `protocols`
    (default FP and FF). `alignment`: how photos are aligned (default: eval.align's defaults)."""
    from . import _photos
    alignment = alignment if alignment is not None else Alignment()
    out: List[VerificationSet] = []
    for p in map(Path, paths):
        if _photos.is_cfp_root(p):
            for protocol in protocols or _photos.CFP_PROTOCOLS:
                out.append(_photos.load_cfp(p, protocol, alignment.settings(), alignment.flags()))
        elif align and (p.is_dir() or p.suffix == '.txt'):
            out.append(_photos.load_photo_folder(p, alignment.settings(), alignment.flags()))
        elif align:
            raise UserError(f'--align: {p} is not a folder of photos with pairs.txt (packs hold aligned crops)')
        else:
            out.append(load_verification_set(p))
    return out
