"""Verification on any insightface packs: `python -m eval.verify --model NAME --data lfw.bin --data cfp_fp.bin ...`.

--data is repeatable (packs or aligned folders with pairs.txt); --data-dir DIR with --targets (default lfw, cfp_fp,
agedb_30) picks the packs found there. Prints one JSON object whose `results` list holds one entry per dataset,
plus `mean_accuracy`.
"""
from typing import Any, Dict, List, Optional, Sequence

from ._flags import build_parser, cli, parse, resolve_data, verification
from ._result import write_result

TARGETS = ('lfw', 'cfp_fp', 'agedb_30')


def parse_args(argv: Optional[List[str]] = None):
    return parse(build_parser('python -m eval.verify', __doc__.splitlines()[0], TARGETS, multi=True), argv)


def command_line(model_name: str, checkpoint: str, data: Sequence[str], batch_size: int = 64) -> Dict[str, Any]:
    """`command` and `rerun` of this CLI on a checkpoint (`eval.api.verify_command`)."""
    argv = ['--model', model_name, '--checkpoint', checkpoint, '-b', str(batch_size)]
    for path in data:
        argv += ['--data', str(path)]
    args = parse_args(argv)
    return dict(command=args.command, rerun=args.rerun)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    result = verification(args, resolve_data(args, TARGETS))
    return write_result(result.to_json('verify'), args.results_file)


if __name__ == '__main__':
    main()
