"""CFP-FP and CFP-FF verification: `python -m eval.cfp --model NAME --data-dir DIR` (or --data cfp_fp.bin ...).

Evaluates every pack given with --data, or `cfp_fp.bin` and `cfp_ff.bin` found in --data-dir (both when both are
there); or CFP's own photos: `--data <CFP root> --protocol FP|FF` reads `Protocol/Pair_list_*.txt` and every
`Protocol/Split/<protocol>/NN/` fold present, aligns the photos once (cached; see eval.align) and scores the
dataset's own folds. Prints one JSON object whose `results` list holds one entry per pack or protocol (accuracy
+- std over the folds, AUC and EER, as CFP's readme asks).

A protocol that cannot be scored as written (a malformed line, an image number not in ASCII digits, a path with a
control character, no pairs, a single fold, folds of unequal sizes) stops the run with one `error:` line naming the
file and line, exit code 2, while the protocol is read: before any photo is aligned or the model is built.
"""
from typing import Dict, List, Optional

from ._flags import build_parser, cli, parse, resolve_data, verification
from ._result import write_result

TARGETS = ('cfp_fp', 'cfp_ff')


def parse_args(argv: Optional[List[str]] = None):
    parser = build_parser('python -m eval.cfp', __doc__.splitlines()[0], TARGETS, multi=True)
    parser.add_argument('--protocol', action='append', choices=('FP', 'FF'), default=None,
                        help='with a CFP root: the protocol to score (repeatable; default: FP and FF)')
    return parse(parser, argv)


@cli
def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    result = verification(args, resolve_data(args, TARGETS))
    return write_result(result.to_json('cfp'), args.results_file)


if __name__ == '__main__':
    main()
