"""`train.compare_blocks`' report: trainability and accuracy per run, the per-model summary, the markdown tables and
the curves."""
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from timm_mobileone.files import atomic_write

BLOW_UP = 3.0  # a logged loss above this multiple of the first one counts as a blow-up


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return dict(mean=None, std=None, n=0)
    return dict(mean=round(float(np.mean(vals)), 5), std=round(float(np.std(vals)), 5), n=len(vals))


def trainability(run: Dict[str, Any]) -> Dict[str, Any]:
    losses = [r['loss'] for r in run['rows'] if 'loss' in r and not r.get('diverged')]
    norms = [r['grad_norm'] for r in run['rows'] if r.get('grad_norm') is not None]
    finite = [x for x in losses if math.isfinite(x)]
    tail = finite[-max(1, len(finite) // 10):] if finite else []
    return dict(
        first_loss=finite[0] if finite else None, final_loss=float(np.mean(tail)) if tail else None,
        blew_up=bool(finite) and max(finite) > BLOW_UP * finite[0],
        grad_norm_median=float(np.median(norms)) if norms else None,
        grad_norm_max=float(np.max(norms)) if norms else None,
        grad_norm_cv=float(np.std(norms) / np.mean(norms)) if norms and np.mean(norms) > 0 else None,
    )


def accuracies(run: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """Per validation pack: the best and the final accuracy over the run's validations."""
    vals = [r['val'] for r in run['rows'] if 'val' in r]
    packs = sorted({k for v in vals for k in v})
    return {p: dict(best=max(v[p] for v in vals if p in v), final=[v[p] for v in vals if p in v][-1])
            for p in packs}


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ''
    if isinstance(x, dict):
        if x.get('mean') is None:
            return ''
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}" if x['n'] > 1 else f"{x['mean']:.{digits}f}"
    return f'{x:.{digits}g}' if isinstance(x, float) else str(x)


def summarize_models(models: List[str], runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per model and learning rate: accuracy, trainability and INT8 figures over seeds (mean, std)."""
    out = []
    for model in models:
        for lr in sorted({r['config']['lr'] for r in runs if r['model'] == model}):
            mine = [r for r in runs if r['model'] == model and r['config']['lr'] == lr]
            packs = sorted({p for r in mine for p in r['accuracy']})
            acc = {p: dict(best=_mean_std([r['accuracy'].get(p, {}).get('best') for r in mine]),
                           final=_mean_std([r['accuracy'].get(p, {}).get('final') for r in mine])) for p in packs}
            tr = [r['trainability'] for r in mine]
            entry = dict(
                model=model, lr=lr, seeds=[r['config']['seed'] for r in mine], accuracy=acc,
                diverged=sum(r['diverged'] for r in mine), blew_up=sum(t['blew_up'] for t in tr),
                final_loss=_mean_std([t['final_loss'] for t in tr]),
                grad_norm_median=_mean_std([t['grad_norm_median'] for t in tr]),
                grad_norm_max=_mean_std([t['grad_norm_max'] for t in tr]),
                grad_norm_cv=_mean_std([t['grad_norm_cv'] for t in tr]))
            agree = [r['teacher_agreement'] for r in mine if r.get('teacher_agreement')]
            if agree:
                entry['teacher_agreement'] = dict(cosine_mean=_mean_std([a['cosine_mean'] for a in agree]),
                                                  cosine_p05=_mean_std([a['cosine_p05'] for a in agree]))
            auc = [x.get('auc') for r in mine if r.get('best') for x in r['best']['results']]
            entry['best_auc'] = _mean_std([a for a in auc if a is not None])
            q = [r['int8'] for r in mine if r.get('int8')]
            if q:
                entry['int8'] = dict(
                    cosine_mean=_mean_std([x['cosine_mean'] for x in q]),
                    cosine_min=_mean_std([x['cosine_min'] for x in q]),
                    accuracy_fp32={p: _mean_std([x['accuracy_fp32'].get(p) for x in q]) for p in packs},
                    accuracy_int8={p: _mean_std([x['accuracy_int8'].get(p) for x in q]) for p in packs},
                    range_spread_median=_mean_std([x['weights']['range_spread_median'] for x in q]),
                    range_spread_max=_mean_std([x['weights']['range_spread_max'] for x in q]),
                    kurtosis_median=_mean_std([x['weights']['kurtosis_median'] for x in q]),
                    kurtosis_max=_mean_std([x['weights']['kurtosis_max'] for x in q]))
            out.append(entry)
    return out


def markdown(report: Dict[str, Any]) -> str:
    models, rows = report['models'], report['summary']
    lines = [f"Compared with `{report['command']}`", '']
    if report.get('training_cost'):
        lines += ['**Cost of training and deployment**', '',
                  '| model | train params (M) | train GMACs | step (s) at batch '
                  f"{report['training_cost'][0]['batch_size']} | step memory (MB) | fused params (M) | fused GMACs "
                  '| fused batch-1 latency (ms) |', '|---|---:|---:|---:|---:|---:|---:|---:|']
        for m, t, d in zip(models, report['training_cost'], report['deploy_cost']):
            lines.append(f"| {m} | {t['params_m']} | {t['gmacs']} | {t['step_s']} | {t['step_memory_mb']} | "
                         f"{d['params_m']} | {d['gmacs']} | {d['latency_ms']} |")
        lines.append('')
    packs = sorted({p for r in rows for p in r['accuracy']})
    lines += ['**Accuracy and trainability** (mean ± std over seeds)', '',
              '| model | lr | seeds | ' + ' | '.join(f'{p} best | {p} final' for p in packs)
              + ' | final loss | grad norm median / max | diverged | blew up |',
              '|---|---:|---|' + '---:|' * (2 * len(packs) + 4)]
    for r in rows:
        acc = ' | '.join(f"{_fmt(r['accuracy'][p]['best'])} | {_fmt(r['accuracy'][p]['final'])}" for p in packs)
        lines.append(f"| {r['model']} | {r['lr']:g} | {','.join(map(str, r['seeds']))} | {acc} | "
                     f"{_fmt(r['final_loss'])} | {_fmt(r['grad_norm_median'], 3)} / {_fmt(r['grad_norm_max'], 3)} | "
                     f"{r['diverged']} | {r['blew_up']} |")
    if any(r.get('teacher_agreement') for r in rows):
        lines += ['', '**Agreement with the teacher** on the validation crops (cosine of student and teacher '
                  'embeddings per image; best weights) and the best checkpoint\'s ROC AUC', '',
                  '| model | lr | cosine mean | cosine 5th percentile | best AUC |', '|---|---:|---:|---:|---:|']
        for r in rows:
            a = r.get('teacher_agreement')
            if a:
                lines.append(f"| {r['model']} | {r['lr']:g} | {_fmt(a['cosine_mean'])} | {_fmt(a['cosine_p05'])} | "
                             f"{_fmt(r['best_auc'])} |")
    if any(r.get('int8') for r in rows):
        lines += ['', '**INT8 post-training quantization** (ONNX QDQ, the same calibration images)', '',
                  '| model | lr | ' + ' | '.join(f'{p} FP32 / INT8' for p in packs)
                  + ' | INT8 vs FP32 cosine mean / min | channel range spread median / max | kurtosis median / max |',
                  '|---|---:|' + '---:|' * (len(packs) + 3)]
        for r in rows:
            q = r.get('int8')
            if not q:
                continue
            acc = ' | '.join(f"{_fmt(q['accuracy_fp32'][p])} / {_fmt(q['accuracy_int8'][p])}" for p in packs)
            lines.append(f"| {r['model']} | {r['lr']:g} | {acc} | {_fmt(q['cosine_mean'])} / {_fmt(q['cosine_min'])}"
                         f" | {_fmt(q['range_spread_median'], 3)} / {_fmt(q['range_spread_max'], 3)} | "
                         f"{_fmt(q['kurtosis_median'], 3)} / {_fmt(q['kurtosis_max'], 3)} |")
    return '\n'.join(lines) + '\n'


def plot(path: Path, runs: List[Dict[str, Any]], models: List[str]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {m: f'C{i}' for i, m in enumerate(models)}
    for r in runs:
        label = f"{r['model']} seed {r['config']['seed']} lr {r['config']['lr']:g}"
        loss = [(x['step'], x['loss']) for x in r['rows'] if 'loss' in x and not x.get('diverged')]
        val = [(x['step'], x['mean_accuracy']) for x in r['rows'] if 'mean_accuracy' in x]
        if loss:
            ax_loss.plot(*zip(*loss), color=colors[r['model']], alpha=0.8, label=label)
        if val:
            ax_acc.plot(*zip(*val), color=colors[r['model']], marker='o', alpha=0.8, label=label)
    ax_loss.set(xlabel='step', ylabel='training loss', title='loss')
    ax_acc.set(xlabel='step', ylabel='mean validation accuracy', title='validation')
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    buf = __import__('io').BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
