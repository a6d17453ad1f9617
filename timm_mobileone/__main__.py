"""The zoo report: `python -m timm_mobileone` prints every mobileone_112 variant's size and compute.

Params and GMACs of the train-time (multi-branch) and fused (reparameterized) forms at the pretrained cfg's input
size (112x112). Needs no data and no network. `--json` prints one JSON object instead of the table.
"""
import argparse
import json
import logging
import sys
from typing import Dict, List, Optional

import torch
import timm

from . import __version__
from .profile import profile_model

_logger = logging.getLogger('timm_mobileone')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m timm_mobileone', description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('-m', '--model', action='append', default=None, metavar='NAME',
                        help='variant to report (repeatable); default: all mobileone_112_* models')
    parser.add_argument('--json', action='store_true', help='print one JSON object instead of a markdown table')
    return parser.parse_args(argv)


def _table(rows: List[Dict]) -> str:
    lines = [
        '| model | params (M) train-time | params (M) fused | GMACs train-time | GMACs fused | input |',
        '|---|---:|---:|---:|---:|---|',
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params_m']:.2f} | {r['fused_params_m']:.2f} | {r['gmacs']:.3f} "
            f"| {r['fused_gmacs']:.3f} | {r['input_size'][1]}x{r['input_size'][2]} |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    available = timm.list_models('mobileone_112_*')
    names = args.model or available
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f'error: unknown model(s) {", ".join(unknown)}; choose from {", ".join(available)}', file=sys.stderr)
        raise SystemExit(2)
    rows = []
    for name in names:
        model = timm.create_model(name)
        input_size = tuple(model.pretrained_cfg['input_size'])
        rows.append(dict(model=name, input_size=input_size, **profile_model(model, input_size)))
    result = dict(
        models=rows,
        versions=dict(timm_mobileone=__version__, timm=timm.__version__, torch=torch.__version__),
    )
    print(json.dumps(result) if args.json else _table(rows))
    return result


if __name__ == '__main__':
    main()
