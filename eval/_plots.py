"""ROC plots of the eval CLIs' --plot (matplotlib, Agg backend)."""
from pathlib import Path
from typing import Dict, List, Tuple

from timm_mobileone.errors import UserError


def roc_figure():
    """(pyplot, figure, axes) for a ROC plot; UserError without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib (pip install matplotlib)') from None
    fig, ax = plt.subplots(figsize=(5, 4.5))
    return plt, fig, ax


def save_roc(plt, fig, ax, path: str, xlim: Tuple[float, float], title: str) -> None:
    """Log-FAR axes, labels, legend, then write the ROC plot to `path`."""
    ax.set_xscale('log')
    ax.set_xlim(*xlim)
    ax.set_xlabel('false accept rate')
    ax.set_ylabel('true accept rate')
    ax.set_title(title)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_verification(path: str, curves: List[Tuple[str, Dict]]) -> None:
    """The fold-mean ROC of each (dataset name, metrics) with its TAR@FAR point."""
    plt, fig, ax = roc_figure()
    for name, m in curves:
        ax.plot(m['fpr'], m['tpr'], label=f"{name} (acc {m['accuracy']:.4f})")
        if m['tar_at_far'] is not None:
            ax.scatter([m['far_target']], [m['tar_at_far']], marker='o', zorder=3)
            ax.annotate(f"TAR {m['tar_at_far']:.4f} @ FAR {m['far_target']:g}", (m['far_target'], m['tar_at_far']),
                        textcoords='offset points', xytext=(6, -12), fontsize=8)
    save_roc(plt, fig, ax, path, (1e-4, 1), 'ROC (10-fold mean)')
