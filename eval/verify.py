"""Verification on any insightface packs: `python -m eval.verify --model NAME --data lfw.bin --data cfp_fp.bin ...`.

--data is repeatable (packs or aligned folders with pairs.txt); --data-dir DIR with --targets (default lfw, cfp_fp,
agedb_30) picks the packs found there. Prints one JSON object whose `results` list holds one entry per dataset,
plus `mean_accuracy`.
"""
from typing import Dict, List, Optional

from ._common import build_parser, cli, finish, parse, resolve_data, run

TARGETS = ('lfw', 'cfp_fp', 'agedb_30')


def parse_args(argv: Optional[List[str]] = None):
    return parse(build_parser('python -m eval.verify', __doc__.splitlines()[0], TARGETS, multi=True), argv)


def summarize(out: Dict) -> Dict:
    """The eval.verify JSON object from `run`'s output: common keys, `results`, `mean_accuracy`."""
    accs = [r['accuracy'] for r in out['results']]
    return dict(out['common'], results=out['results'], mean_accuracy=round(sum(accs) / len(accs), 5),
                seconds=out['seconds'], versions=out['versions'])


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    return finish(summarize(run(args, resolve_data(args, TARGETS))), args)


if __name__ == '__main__':
    main()
