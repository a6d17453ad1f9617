"""Which parts of consistent teaching help at a given budget: train.face students of one teacher, the same steps,
seed and data, one recipe part added at a time; judged on the selection set only (never on the held-out fold).

    python benchmarks/distill_ablation.py --data .distill_data --out /tmp/ablation --epochs 1 -b 32 --lr 0.1 \
        [--configs cached views mix full] [train.face flags, e.g. --device cuda --amp --preload -j 8]

Configs (each a train.face run in OUT/<config>):
- `cached`: no augmentation, the teacher's cached targets (the earlier recipe);
- `views`: the teacher online on crops near the aligned framing, rotation, colour, blur and grayscale;
- `mix`: `views` plus mixup or cutmix between faces on every batch;
- `full`: `mix` plus the relational loss (the gpu_distill.sh recipe);
- `relational`: no augmentation, the relational loss beside the cosine.
For each: training seconds and images/s from the run's log, the selection set's accuracy and AUC at the end, and
the agreement with the teacher on the selection crops (per image, the cosine of the student's and the teacher's
flip-summed embeddings: finer than pair accuracy; mean and 5th percentile). One JSON object on stdout, a markdown
table on stderr.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VIEWS = ['--crop-scale', '0.8', '1', '--crop-ratio', '0.9', '1.1', '--rotate', '8', '--color-jitter', '0.3',
         '--gaussian-blur-prob', '0.1', '--grayscale-prob', '0.1']
MIX = ['--mixup', '0.4', '--cutmix', '1.0']
CONFIGS = {'cached': [], 'views': VIEWS, 'mix': VIEWS + MIX, 'full': VIEWS + MIX + ['--relational-weight', '1.0'],
           'relational': ['--relational-weight', '1.0']}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', type=Path, default=REPO / '.distill_data', help='benchmarks/distill_data.py output')
    p.add_argument('--out', type=Path, required=True)
    p.add_argument('--configs', nargs='+', default=['cached', 'views', 'mix', 'full'], choices=list(CONFIGS))
    p.add_argument('--model', default='mobileone_112_s0')
    args, extra = p.parse_known_args(argv)
    from train import face
    from train.compare_measure import teacher_agreement
    from distill_report import read_run
    teacher = args.data / 'teacher' / 'model-0000.params'
    select = args.data / 'select'
    rows = []
    for name in args.configs:
        out = args.out / name
        form = ['--train-form', 'merged'] if args.model.startswith('mobileone_112_s') else []
        flags = ['--model', args.model, *form, '--model-kwargs', 'embed_dim=128', '--data',
                 str(args.data / 'split' / 'train'), '--val', str(select), '--loss', 'none', '--teacher',
                 'mobilefacenet', '--teacher-checkpoint', str(teacher), '--no-export', '--output', str(out),
                 '--seed', '1', '--teacher-cache', str(args.out / 'teacher.safetensors'), *CONFIGS[name], *extra]
        if not (out / 'final.safetensors').is_file():
            face.main(flags + (['--resume'] if (out / 'last.json').is_file() else []))
        run = read_run(out)  # distill_report's summary of the run: steps, seconds, images/s, best and final
        best = run.get('best') or {}
        final_is_best = best.get('step') == run['curve'][-1]['step']
        rows.append(dict(config=name, folder=str(out), flags=CONFIGS[name], steps=run['steps'],
                         seconds=run['seconds'], images_per_second=run['images_per_second'],
                         select_accuracy=run['final'][select.name],
                         select_auc=best[select.name]['auc'] if final_is_best else None))
    runs = [dict(model=args.model, config=dict(teacher='mobilefacenet', teacher_checkpoint=str(teacher)),
                 diverged=False, weights=str(Path(r['folder']) / 'final.safetensors')) for r in rows]
    device = next((extra[i + 1] for i, a in enumerate(extra) if a == '--device'), 'cpu')
    teacher_agreement(runs, [(args.model, {'embed_dim': 128})], [args.model], [str(select)], device)
    for row, run in zip(rows, runs):
        row['teacher_agreement'] = run.get('teacher_agreement')
    lines = ['| config | steps | seconds | images/s | select accuracy (final) | '
             'agreement with the teacher, mean / p5 |',
             '|---|---:|---:|---:|---:|---:|']
    for r in rows:
        a = r['teacher_agreement'] or {}
        lines.append(f"| {r['config']} | {r['steps']} | {r['seconds']:.0f} | {r['images_per_second']:.1f} | "
                     f"{r['select_accuracy']:.4f} | {a.get('cosine_mean', '-')} / {a.get('cosine_p05', '-')} |")
    print('\n'.join(lines), file=sys.stderr)
    result = dict(rows=rows, table='\n'.join(lines))
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
