"""LFW verification with insightface's 10-fold protocol: `python -m eval.lfw --model NAME --data lfw.bin`.

--data takes insightface's `lfw.bin` or a folder of aligned LFW images with `pairs.txt`; --data-dir looks for
`lfw.bin`. Prints one JSON object (model, dataset, num_pairs, accuracy, accuracy_std, thresholds, tar_at_far, auc,
xnorm, ...).
"""
from typing import Dict, List, Optional

from ._flags import UserError, build_parser, cli, parse, resolve_data, verification
from ._result import write_result

TARGETS = ('lfw',)


def parse_args(argv: Optional[List[str]] = None):
    return parse(build_parser('python -m eval.lfw', __doc__.splitlines()[0], TARGETS, multi=False), argv)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    if args.data and len(args.data) > 1:
        raise UserError('eval.lfw takes one --data; use python -m eval.verify for several')
    result = verification(args, resolve_data(args, TARGETS))
    return write_result(result.to_json('lfw'), args.results_file)


if __name__ == '__main__':
    main()
