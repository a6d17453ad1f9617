"""The eval result schema: what every eval CLI writes (`--results-file`, stdout) and what the Hub tools read.

Every eval entry point (`eval.lfw`, `eval.cfp`, `eval.verify`, `eval.ijb`, `eval.imagenet`) writes one JSON object
with its own detail (folds, thresholds, timings, versions) and, for the Hub tools, two schema fields:

    "schema": "timm_mobileone.eval/1",
    "rows": [                                  # one per dataset scored
      {"dataset": "lfw", "kind": "verification", "num": 6000, "flip": true,
       "accuracy": 0.995, "accuracy_std": 0.003, "tar_at_far": 0.98, "far_target": 0.001,
       "threshold": 0.31},                   # the cosine of same / different (optional; `cosine_threshold`)
      {"dataset": "ijbc", "kind": "ijb", "num": 15658489, "flip": true,
       "tar_at_far": {"1e-6": ..., "1e-5": ..., "1e-4": ..., "1e-3": ..., "1e-2": ..., "1e-1": ...}, "auc": ...},
      {"dataset": "imagenet", "kind": "classification", "num": 50000, "top1": 71.4, "top5": 90.2}
    ],
    "rerun": {"module": "eval.lfw", "args": ["--data", "lfw.bin", "-b", "256"]}

`rerun` is the command as anyone can rerun it on published weights: the eval writes it from its own parser,
leaving out the model and its local weights (`--model`, `--checkpoint`, `--pretrained`), its local outputs
(`--results-file`, `--save-embeddings`, ...) and saved inputs that stand for the model (`--embeddings`,
`--features`), and quoting data paths by their file name only. A model card then quotes
`python -m <module> --model hf-hub:<repo> --pretrained <args>`. The Hub tools know nothing of any eval's flags.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import UserError

SCHEMA = 'timm_mobileone.eval/1'
KINDS = ('verification', 'ijb', 'classification')
IJB_FARS = ('1e-6', '1e-5', '1e-4', '1e-3', '1e-2', '1e-1')  # eval.ijb's tar_at_far keys
_NUMBER = (int, float)


def _check_row(row: Any, where: str) -> Dict[str, Any]:
    if not isinstance(row, dict) or row.get('kind') not in KINDS or not isinstance(row.get('dataset'), str):
        raise UserError(f'{where}: a row without a dataset name and a kind ({", ".join(KINDS)})')
    if row['kind'] == 'verification':
        need = ('accuracy',)
    elif row['kind'] == 'classification':
        need = ('top1',)
    else:
        tar = row.get('tar_at_far')
        if not (isinstance(tar, dict) and all(isinstance(tar.get(k), _NUMBER) for k in IJB_FARS)):
            raise UserError(f'{where}: an IJB row without TAR at FAR {", ".join(IJB_FARS)}')
        need = ()
    missing = [k for k in need if not isinstance(row.get(k), _NUMBER)]
    if missing:
        raise UserError(f'{where}: a {row["kind"]} row without {", ".join(missing)}')
    return row


def read(path: str) -> Dict[str, Any]:
    """An eval result file checked against the schema: {'rows': [...], 'rerun': {...} or None}; UserError naming
    the file otherwise."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'--results {path}: not a readable JSON file ({str(e).splitlines()[0] if str(e) else e})') \
            from None
    if not isinstance(obj, dict) or obj.get('schema') != SCHEMA or not isinstance(obj.get('rows'), list):
        raise UserError(f'--results {path}: not an eval result of schema {SCHEMA} (write it with python -m eval.* '
                        f'--results-file)')
    rows = [_check_row(r, f'--results {path}') for r in obj['rows']]
    rerun = obj.get('rerun')
    if not (isinstance(rerun, dict) and isinstance(rerun.get('module'), str) and isinstance(rerun.get('args'), list)
            and all(isinstance(a, str) for a in rerun['args'])):
        rerun = None
    return dict(rows=rows, rerun=rerun)


def rerun_command(rerun: Optional[Dict[str, Any]], repo_id: str) -> Optional[str]:
    """The command a model card quotes: the eval on the Hub repo's weights."""
    import shlex
    if not rerun:
        return None
    return shlex.join(['python', '-m', rerun['module'], '--model', f'hf-hub:{repo_id}', '--pretrained',
                       *rerun['args']])


def portable_args(parser, argv: Sequence[str], drop: Sequence[str], paths: Sequence[str]) -> List[str]:
    """`argv` without the flags in `drop` (with their values) and with the values of the flags in `paths` reduced to
    their file names; `parser` (argparse) says which flags take values."""
    takes_value = {opt: action.nargs != 0 for action in parser._actions for opt in action.option_strings}
    multi = {opt for action in parser._actions for opt in action.option_strings if action.nargs in ('+', '*')}
    out: List[str] = []
    i, argv = 0, list(argv)
    while i < len(argv):
        flag, eq, value = argv[i].partition('=')
        i += 1
        if not flag.startswith('-') or flag not in takes_value:
            out.append(argv[i - 1])
            continue
        values = [value] if eq else []
        if takes_value[flag] and not eq:
            while i < len(argv) and not (argv[i].startswith('-') and argv[i] in takes_value):
                values.append(argv[i])
                i += 1
                if flag not in multi:
                    break
        if flag in drop:
            continue
        if flag in paths:
            values = [Path(v.rstrip('/')).name or '.' for v in values]
        out += [flag, *values]
    return out


def rows_of(out: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Schema rows of verification results, `{'common': ..., 'results': [...]}` (eval's `VerificationResult.rows`: one
    per dataset; whether the flip test ran is one of the `common` keys)."""
    flip = out['common'].get('flip')
    return [dict(dataset=r['dataset'], kind='verification', num=r.get('num_pairs'), flip=flip,
                 accuracy=r['accuracy'], accuracy_std=r.get('accuracy_std'), tar_at_far=r.get('tar_at_far'),
                 far_target=r.get('far_target', 1e-3), threshold=cosine_threshold(r.get('thresholds')))
            for r in out['results']]


def cosine_threshold(thresholds: Any) -> Optional[float]:
    """The cosine at and above which a pair is 'same', from insightface's per-fold best thresholds (squared L2
    distances t of unit embeddings: same when |a - b|^2 < t, i.e. cosine > 1 - t / 2): the folds' median. None where
    there are none."""
    if not (isinstance(thresholds, list) and thresholds
            and all(isinstance(t, _NUMBER) and not isinstance(t, bool) and 0 <= t <= 4 for t in thresholds)):
        return None
    ordered = sorted(float(t) for t in thresholds)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return round(1.0 - median / 2.0, 6)
