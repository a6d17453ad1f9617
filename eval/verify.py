"""Verification on any insightface packs: `python -m eval.verify --model NAME --data lfw.bin --data cfp_fp.bin ...`.

--data is repeatable (packs or aligned folders with pairs.txt); --data-dir DIR with --targets (default lfw, cfp_fp,
agedb_30) picks the packs found there. Prints one JSON object whose `results` list holds one entry per dataset,
plus `mean_accuracy`.
"""
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from timm_mobileone import results as R
from timm_mobileone.verification_data import VerificationSet

from ._common import build_parser, cli, finish, parse, resolve_data, run

TARGETS = ('lfw', 'cfp_fp', 'agedb_30')


def parse_args(argv: Optional[List[str]] = None):
    return parse(build_parser('python -m eval.verify', __doc__.splitlines()[0], TARGETS, multi=True), argv)


def summarize(out: Dict) -> Dict:
    """The eval.verify JSON object from `run`'s output: common keys, `results`, `mean_accuracy`."""
    accs = [r['accuracy'] for r in out['results']]
    return dict(out['common'], results=out['results'], mean_accuracy=round(sum(accs) / len(accs), 5),
                seconds=out['seconds'], versions=out['versions'])


def verify(model: torch.nn.Module, sets: Sequence[VerificationSet], batch_size: int = 64,
           device: Union[str, torch.device] = 'cpu', flip: bool = True) -> Dict[str, Any]:
    """eval.verify's protocol (flip test, insightface's 10-fold metric) on a built model in eval mode on `device`:
    the JSON object the CLI prints, schema rows included (no `command`/`rerun`: the caller knows what reproduces it,
    see `verify_command`)."""
    args = parse_args(['-b', str(batch_size), '-j', '0', '--device', str(device), '--no-progress']
                      + ([] if flip else ['--no-flip']))
    out = run(args, list(sets), model=model)
    return dict(summarize(out), command=None, schema=R.SCHEMA, rows=R.rows_of(out), rerun=None)


def verify_command(model_name: str, checkpoint: str, data: Sequence[str], batch_size: int = 64) -> Dict[str, Any]:
    """`command` (the local command line) and `rerun` (the portable one, see timm_mobileone.results) of eval.verify on
    a checkpoint: what a result of `verify` records so that it can be reproduced from the weights alone."""
    argv = ['--model', model_name, '--checkpoint', checkpoint, '-b', str(batch_size)]
    for path in data:
        argv += ['--data', str(path)]
    args = parse_args(argv)
    return dict(command=args.command, rerun=args.rerun)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    out = run(args, resolve_data(args, TARGETS))
    return finish(summarize(out), args, R.rows_of(out))


if __name__ == '__main__':
    main()
