"""INT8 judged on a trained face model: insightface's MobileFaceNet (or a trained student) through the project's
INT8 paths, on real LFW.

    python benchmarks/int8_trained.py --data ../shared/data/lfw_dev \
        --checkpoint ../shared/data/mobilefacenet_y1/model-0000.params --out /tmp/int8 [--variants plain,equalize]
    python benchmarks/int8_trained.py --model mobileone_112_s0 --checkpoint RUN/best.safetensors \
        --data SPLIT/val --calib SPLIT/train --out /tmp/int8-s0          # a distilled student (train.split folders)

For each variant (`plain`: the fused model as it is, `export --equalize off`; `equalize`: cross-layer equalization
first, `--equalize on`, what `--int8` does by default for models that list their layer pairs), each runtime (ONNX
Runtime static QDQ; ExecuTorch PT2E with the XNNPACK quantizer; ncnn, FP32 only) and precision: the LFW-dev accuracy
as `python -m eval.lfw` scores the exported artifact (`eval.api.verify`: insightface's protocol, the pairs.txt
header's folds), and INT8 vs FP32 cosine of the flip-summed, normalized embeddings verification uses (mean, min over all 6,922 pair
images). Calibration crops are people who appear in no pair of `pairs.txt` (the folder's 1,468 unpaired people), or
of the `--calib` folder (a student's training people), one image each, the first `--calib-images` by name. The
activation spread (largest / median per-channel max |activation|, per activation layer) names the layers a
per-tensor INT8 scale serves worst. With `--cfp ROOT` (a raw CFP root, e.g. `../shared/data/cfp_dev`), every
runtime and precision is also scored on CFP-FP as `python -m eval.cfp --protocol FP` scores it (photos aligned once
into eval's cache). Prints one JSON object.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.api import (  # noqa: E402
    DEFAULT_WORKERS, ArtifactSpec, EmbedOptions, load_datasets, load_model, verify)
from timm_mobileone.export import main as export_main  # noqa: E402
from timm_mobileone.verification_data import read_pairs_txt  # noqa: E402


def unpaired_people(data: Path):
    paired = read_pairs_txt(data / 'pairs.txt').people()
    return sorted(p.name for p in data.iterdir() if p.is_dir() and p.name not in paired)


def calib_folder(data: Path, out: Path, count: int, people_from: Path = None) -> Path:
    folder = out / 'calib'
    folder.mkdir(parents=True, exist_ok=True)
    source = people_from or data
    people = (sorted(p.name for p in source.iterdir() if p.is_dir()) if people_from else unpaired_people(data))
    for name in people[:count]:
        src = sorted((source / name).glob('*.jpg'))[0]
        dst = folder / src.name
        if not dst.exists():
            dst.symlink_to(src.resolve())
    return folder


def activation_spread(model_name: str, checkpoint: str, calib: Path, images: int = 64):
    """Per layer (each PReLU / ReLU output and the GDC conv's): largest / median per-channel max |activation| over
    `images` calibration crops, for the fused model as trained and after cross-layer equalization; the five worst,
    and the median over all layers."""
    import copy
    import timm
    import torch
    from PIL import Image
    from timm_mobileone.checkpoints import create_model_checked
    from timm_mobileone.deploy.quant import equalize
    fused = timm.utils.reparameterize_model(create_model_checked(model_name, checkpoint=checkpoint).eval())
    cfg = fused.pretrained_cfg
    files = sorted(calib.glob('*.jpg'))[:images]
    x = np.stack([np.array(Image.open(f).convert('RGB')) for f in files]).astype(np.float32).transpose(0, 3, 1, 2)
    x = torch.from_numpy((x / 255 - np.float32(cfg['mean'][0])) / np.float32(cfg['std'][0]))

    def spreads(model):
        out, hooks = {}, []
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.PReLU, torch.nn.ReLU)) or name == 'head.conv_dw':
                def hook(_, __, o, name=name):
                    r = o.detach().abs().amax(dim=(0, 2, 3))
                    out[name] = (float(r.max() / r.median().clamp_min(1e-12)), float(r.max()))
                hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        return out
    plain, equalized = spreads(fused), spreads(equalize(copy.deepcopy(fused)))
    worst = sorted(plain, key=lambda k: -plain[k][0])[:5]
    return dict(layers=len(plain), median_spread_plain=round(float(np.median([v[0] for v in plain.values()])), 1),
                median_spread_equalized=round(float(np.median([v[0] for v in equalized.values()])), 1),
                worst=[dict(layer=k, spread_plain=round(plain[k][0], 1), spread_equalized=round(equalized[k][0], 1),
                            tensor_max_plain=round(plain[k][1], 1), tensor_max_equalized=round(equalized[k][1], 1))
                       for k in worst])


# eval.lfw's and eval.cfp's defaults: batch 64, image + flip, their decoding workers
EVAL_OPTIONS = EmbedOptions(batch_size=64, workers=DEFAULT_WORKERS, flip=True)


def lfw(artifact: ArtifactSpec, data: Path, save: str):
    """eval.lfw's result (its JSON object) on `data` with the artifact, the embeddings saved to `save`."""
    result = verify(load_model(artifact), load_datasets([data]), EVAL_OPTIONS, save_embeddings=save)
    return result.to_json('lfw')


def cfp_fp(artifact: ArtifactSpec, root: Path):
    """eval.cfp's CFP-FP result on the raw CFP root (aligned once into eval's cache) with the artifact."""
    return verify(load_model(artifact), load_datasets([root], protocols=['FP']), EVAL_OPTIONS).results[0]


def export(argv):
    """timm_mobileone.export's result (its JSON line goes to stderr: this script's stdout is one JSON object)."""
    with contextlib.redirect_stdout(sys.stderr):
        return export_main(argv)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, required=True, help='aligned folder with pairs.txt')
    p.add_argument('--model', default='mobilefacenet', help='architecture of --checkpoint')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--calib', type=Path, default=None,
                   help="folder of people to calibrate on (default: --data's people in no pair)")
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--variants', default='plain,equalize')
    p.add_argument('--runtimes', default='onnx,executorch')
    p.add_argument('--calib-images', type=int, default=200)
    p.add_argument('--calib-method', default='minmax', choices=('minmax', 'percentile', 'entropy'))
    p.add_argument('--cfp', type=Path, default=None,
                   help='a raw CFP root (Data/, Protocol/): also score CFP-FP with eval.cfp in every runtime')
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    calib = calib_folder(args.data, args.out, args.calib_images + 100, args.calib)
    rows = []
    for variant in args.variants.split(','):
        flags = ['--equalize', 'on' if variant == 'equalize' else 'off']
        base = ['--model', args.model, '--checkpoint', args.checkpoint] + flags
        for runtime in args.runtimes.split(','):
            t0 = time.time()
            stem = args.out / f'{args.model}_{variant}'
            if runtime == 'onnx':
                fp32, int8 = f'{stem}.onnx', f'{stem}_int8.onnx'
                export(base + ['--out', fp32, '--dynamic-batch', '--int8', '--int8-onnx', int8, '--calib',
                                    str(calib), '--calib-images', str(args.calib_images),
                                    '--calib-method', args.calib_method])
                runs = {'fp32': ArtifactSpec(fp32, 'onnx', args.model), 'int8': ArtifactSpec(int8, 'onnx', args.model)}
            elif runtime == 'ncnn':  # FP32 only (ncnn's INT8 needs its own table tool); the export's pnnx path
                fp32 = f'{stem}.param'
                export(base + ['--format', 'ncnn', '--out', fp32])
                runs = {'fp32': ArtifactSpec(fp32, 'ncnn', args.model)}
            else:
                fp32, int8 = f'{stem}.pte', f'{stem}_int8.pte'
                export(base + ['--format', 'executorch', '--out', fp32])
                export(base + ['--format', 'executorch', '--out', int8, '--int8', '--calib', str(calib),
                                    '--calib-images', str(args.calib_images)])
                runs = {'fp32': ArtifactSpec(fp32, 'executorch', args.model),
                        'int8': ArtifactSpec(int8, 'executorch', args.model)}
            res, emb, cfp = {}, {}, {}
            for precision, artifact in runs.items():
                save = str(args.out / f'emb_{variant}_{runtime}_{precision}.npy')
                res[precision] = lfw(artifact, args.data, save)
                emb[precision] = np.load(save)
                if args.cfp:
                    cfp[precision] = cfp_fp(artifact, args.cfp)
            row = dict(variant=variant, runtime=runtime, fp32_accuracy=res['fp32']['accuracy'],
                       fp32_auc=res['fp32']['auc'], fp32_xnorm=res['fp32']['xnorm'])
            row.update({f'{k}_cfp_fp': v['accuracy'] for k, v in cfp.items()})
            if 'int8' in res:
                cos = np.sum(emb['fp32'] * emb['int8'], axis=1)
                row.update(calib_method=args.calib_method if runtime == 'onnx' else
                           'histogram (XNNPACK quantizer default)', int8_accuracy=res['int8']['accuracy'],
                           points_lost=round(100 * (res['fp32']['accuracy'] - res['int8']['accuracy']), 3),
                           cosine_mean=round(float(cos.mean()), 5), cosine_min=round(float(cos.min()), 5),
                           int8_auc=res['int8']['auc'])
            rows.append(dict(row, seconds=round(time.time() - t0)))
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = dict(model=args.model, checkpoint=args.checkpoint, data=str(args.data),
                  calib=f'{args.calib_images} crops, one per person, of '
                        + (f'{args.calib}' if args.calib else f'the people in no pair of {args.data}'), rows=rows,
                  activation_spread=activation_spread(args.model, args.checkpoint, calib),
                  command='python benchmarks/int8_trained.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
