"""The distillation benchmark's table and curves, from train.face run folders (`benchmarks/gpu_distill.sh` stage 5).

    python benchmarks/distill_report.py --runs OUT/s0 OUT/dbb_s0 --high-lr OUT/highlr-* --plot curves.png \
        --markdown report.md > report.json

Per run, from its `log.jsonl`, `last.json` and `best.json`: images seen (steps x batch x processes), training
seconds, the median images/s of its logged intervals, the step its `--best-on` set chose and every validation set's
accuracy there (the held-out figure is read at that step only: it chose nothing), and the last validation. High
learning-rate runs: diverged (the step) or the last loss. Curves: accuracy against images seen and against seconds.
Reads what a cut run left (no summary needed). One JSON object on stdout.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timm_mobileone.cli import cli  # noqa: E402
from timm_mobileone.errors import UserError  # noqa: E402


def read_run(path: Path) -> Dict[str, Any]:
    """Not train.compare_runs.read_run: that one needs last.json, and a run that diverges (or is cut) before its
    first checkpoint has none, only its log; the high-learning-rate runs are read for exactly that case."""
    from train.checkpoint import read_log
    if not (path / 'log.jsonl').is_file():
        raise UserError(f'{path}: no log.jsonl (not a train.face run folder)')
    rows = read_log(path)
    state = json.loads((path / 'last.json').read_text()) if (path / 'last.json').is_file() else {}
    run = state.get('run', {})
    batch = run.get('batch_size', 0) * run.get('world_size', 1)
    train = [r for r in rows if 'images_per_second' in r]
    vals = [r for r in rows if 'val' in r]
    best = json.loads((path / 'best.json').read_text()) if (path / 'best.json').is_file() else None
    diverged = next((r['step'] for r in rows if r.get('diverged')), None)
    out = dict(run=path.name, model=run.get('model'), train_form=run.get('train_form'), batch=batch,
               steps=max((r['step'] for r in rows if 'step' in r), default=0),
               seconds=max((r.get('seconds', 0) for r in rows), default=0),
               images_per_second=round(statistics.median(r['images_per_second'] for r in train[1:] or train), 1)
               if train else None,
               last_loss=train[-1]['loss'] if train else None, diverged_at=diverged,
               curve=[dict(step=r['step'], images=r['step'] * batch, seconds=r.get('seconds'), **r['val'])
                      for r in vals])
    out['images_seen'] = out['steps'] * batch
    if best is not None:
        out['best'] = dict(step=best['step'], best_on=(state.get('best') or {}).get('best_on', 'mean'),
                           **{r['dataset']: dict(accuracy=r['accuracy'], auc=r.get('auc'))
                              for r in best['results']})
    out['final'] = vals[-1]['val'] if vals else None
    return out


def markdown(runs: List[Dict[str, Any]], high: List[Dict[str, Any]]) -> str:
    sets = sorted({k for r in runs for c in r['curve'] for k in c if k not in ('step', 'images', 'seconds')})
    head = ['run', 'model', 'form', 'images seen', 'seconds', 'images/s', 'best step (chosen on)'] + \
        [f'{s} at best' for s in sets] + [f'{s} final' for s in sets]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in runs:
        b = r.get('best') or {}
        cells = [r['run'], r['model'], r['train_form'], f"{r['images_seen']:,}", f"{r['seconds']:.0f}",
                 str(r['images_per_second']), f"{b.get('step', '-')} ({b.get('best_on', '-')})"]
        cells += [f"{b[s]['accuracy']:.4f}" if s in b else '-' for s in sets]
        cells += [f"{r['final'][s]:.4f}" if r['final'] and s in r['final'] else '-' for s in sets]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if high:
        lines += ['', '| high-lr run | model | steps | diverged at step | last loss |', '|---|---|---:|---:|---:|']
        for r in high:
            loss = f"{r['last_loss']:.4f}" if r['last_loss'] is not None else '-'
            lines.append(f"| {r['run']} | {r['model']} | {r['steps']} | {r['diverged_at'] or 'no'} | {loss} |")
    return '\n'.join(lines) + '\n'


def plot(runs: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        sets = [k for k in (r['curve'][0] if r['curve'] else {}) if k not in ('step', 'images', 'seconds')]
        for s, style in zip(sets, ('-', '--', ':', '-.')):
            for ax, x in zip(axes, ('images', 'seconds')):
                ax.plot([c[x] for c in r['curve']], [c[s] for c in r['curve']], style, marker='o', ms=3,
                        label=f"{r['run']}: {s}")
    axes[0].set_xlabel('training images seen')
    axes[1].set_xlabel('training seconds')
    for ax in axes:
        ax.set_ylabel('verification accuracy')
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@cli
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', nargs='+', type=Path, required=True, help='train.face run folders')
    p.add_argument('--high-lr', nargs='*', type=Path, default=[], help='run folders at a higher learning rate')
    p.add_argument('--plot', type=Path, default=None, help='write the curves here (PNG)')
    p.add_argument('--markdown', type=Path, default=None, help='write the tables here')
    args = p.parse_args(argv)
    runs = [read_run(path) for path in args.runs if (path / 'log.jsonl').is_file()]
    high = [read_run(path) for path in args.high_lr if (path / 'log.jsonl').is_file()]
    if not runs:
        raise UserError('--runs: none of these folders holds a train.face log')
    text = markdown(runs, high)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(runs, args.plot)
    result = dict(runs=runs, high_lr=high, markdown=text)
    print(json.dumps(result))
    return result


if __name__ == '__main__':
    main()
