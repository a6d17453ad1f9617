"""Every runtime's FP32 output against the PyTorch fused model, for all five variants, on face-like crops.

    python benchmarks/deploy_check.py [--models mobileone_112_s0 ...] [--formats onnx executorch ncnn coreml]

For each variant: BN statistics calibrated on generated face-like crops (train/synthetic.py's identities; no trained
face weights exist), saved as a checkpoint, then `python -m timm_mobileone.export --format FMT` of it, which runs
the artifact on held-out crops and fails on a cosine below 0.99999 or a relative error above 1e-3 (export.py says
why). Prints one
JSON object and a markdown table (max relative error / min cosine per variant and runtime; Core ML: op counts, not
run). Needs pip install ".[deploy]".
"""
import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timm_mobileone.deploy.formats import FORMATS  # noqa: E402  (after the sys.path line above)


def main(argv=None) -> dict:
    import timm

    import timm_mobileone  # noqa: F401
    from timm_mobileone import export
    from train.synthetic import identity_images, write_image_folder
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=[f'mobileone_112_s{i}' for i in range(5)])
    p.add_argument('--formats', nargs='+', default=list(FORMATS), choices=list(FORMATS))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crops = write_image_folder(tmp / 'crops', identity_images(16, 4, seed=7))
        for name in args.models:
            torch.manual_seed(0)
            images = export.load_face_images(str(crops), (3, 112, 112), (0.5,) * 3, (0.5,) * 3, 32)
            model = timm.create_model(name).train()
            with torch.no_grad():
                for _ in range(3):
                    model(torch.from_numpy(images))
            ckpt = tmp / f'{name}.pth'
            torch.save(model.state_dict(), ckpt)
            row = dict(model=name)
            for fmt in args.formats:
                out = tmp / name / f'{name}{FORMATS[fmt].suffix}'
                argv_ = ['--model', name, '--checkpoint', str(ckpt), '--format', fmt, '--out', str(out), '--calib',
                         str(crops), '--calib-images', '32', '--heldout-images', '32']
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        r = export.main(argv_)
                    row[fmt] = dict(max_rel_err=r['max_rel_err'], min_cosine=r['min_cosine'], ran=r['ran'],
                                    ops=None if r['ran'] else r.get('ops'), ok=True)
                except SystemExit:
                    row[fmt] = dict(ok=False)
                print(f'{name} {fmt}: {row[fmt]}', file=sys.stderr)
            rows.append(row)
    lines = ['| model | ' + ' | '.join(args.formats) + ' |', '|---|' + '---|' * len(args.formats)]
    for row in rows:
        cells = []
        for fmt in args.formats:
            r = row[fmt]
            if not r['ok']:
                cells.append('**failed**')
            elif not r['ran']:
                cells.append('spec ok, not run')
            else:
                cells.append(f"{r['max_rel_err']:.1e} / {r['min_cosine']:.7f}")
        lines.append(f"| {row['model']} | " + ' | '.join(cells) + ' |')
    result = dict(rows=rows, table='\n'.join(lines), torch=torch.__version__)
    print(result['table'], file=sys.stderr)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
