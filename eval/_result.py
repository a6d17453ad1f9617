"""The verification result (`VerificationResult`, its JSON in each CLI's layout) and what every eval result carries
(`versions`, the schema fields, the file and stdout). Part of eval's public API (`eval.api`)."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from timm_mobileone import results as R
from timm_mobileone.files import atomic_write

LAYOUTS = ('verify', 'lfw', 'cfp')


def versions() -> Dict[str, str]:
    import timm
    import timm_mobileone
    return dict(timm_mobileone=timm_mobileone.__version__, timm=timm.__version__, torch=torch.__version__,
                numpy=np.__version__)


@dataclass
class VerificationResult:
    """What `verify` / `verify_embeddings` found.

    `setup`: how the embeddings were made (model, tag, onnx, runtime, artifact, checkpoint, embeddings, flip, reparam,
    input_size, preprocessing, num_folds); `results`: one entry per dataset (accuracy +- std over the folds,
    per-fold accuracies and thresholds, TAR@FAR, AUC, EER, xnorm, timings); `seconds` overall; `versions`;
    `command` and `rerun` (the command line that reproduces it and its portable form, `timm_mobileone.results`):
    None for a library call unless the caller sets them (`verify_command`).
    """
    setup: Dict[str, Any]
    results: List[Dict[str, Any]]
    seconds: float
    versions: Dict[str, str]
    command: Optional[str] = None
    rerun: Optional[Dict[str, Any]] = None

    @property
    def mean_accuracy(self) -> float:
        accs = [r['accuracy'] for r in self.results]
        return round(sum(accs) / len(accs), 5)

    def rows(self) -> List[Dict[str, Any]]:
        """The schema rows (`timm_mobileone.results`), one per dataset."""
        return R.rows_of(dict(common=self.setup, results=self.results))

    def to_json(self, layout: str = 'verify') -> Dict[str, Any]:
        """The JSON object the CLI of `layout` prints: 'verify' (`results` list and `mean_accuracy`, also what the
        library call gives), 'lfw' (the one dataset's keys at the top level) or 'cfp' (`results` list); each with the
        schema fields `schema`, `rows`, `rerun`."""
        common = dict(self.setup, command=self.command)
        if layout == 'verify':
            out = dict(common, results=self.results, mean_accuracy=self.mean_accuracy, seconds=self.seconds,
                       versions=self.versions)
        elif layout == 'lfw':
            out = dict(common, **self.results[0])
            out.update(seconds=self.seconds, versions=self.versions)
        elif layout == 'cfp':
            out = dict(common, results=self.results, seconds=self.seconds, versions=self.versions)
        else:
            raise ValueError(f'layout {layout!r}: one of {", ".join(LAYOUTS)}')
        return dict(out, schema=R.SCHEMA, rows=self.rows(), rerun=self.rerun)


def write_result(result: Dict[str, Any], results_file: str = '') -> Dict[str, Any]:
    """The eval CLIs' output: the JSON object on one stdout line, and in `results_file` when given."""
    text = json.dumps(result)
    if results_file:
        atomic_write(results_file, lambda f: f.write((text + '\n').encode()))
    print(text)
    return result


def save_embeddings(path: str, name: str, embeddings: np.ndarray, several: bool) -> None:
    """--save-embeddings: PATH, or PATH_<dataset>.npy when several sets are scored."""
    out = Path(path)
    if several:
        out = out.with_name(f'{out.stem}_{name}{out.suffix or ".npy"}')
    atomic_write(out, lambda f: np.save(f, embeddings))
