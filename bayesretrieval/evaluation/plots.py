"""Benchmark figures with matplotlib's Agg backend (no display needed): one PNG per call.

matplotlib is an optional dependency (``pip install bayesretrieval[bench]``); it is
imported when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def reliability_diagram(tables: dict, path: str | Path, title: str = "") -> Path:
    """Observed match frequency against mean predicted probability per bin, one line per link.

    Args:
        tables: ``{name: metrics.reliability_table(...)}``.
        path: the PNG to write.
        title: the figure title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for name, table in tables.items():
        filled = np.asarray(table["count"]) > 0
        ax.plot(np.asarray(table["mean_probability"])[filled], np.asarray(table["frequency"])[filled],
                marker="o", label=name)
    ax.set(xlabel="predicted match probability", ylabel="observed match frequency", xlim=(0, 1), ylim=(0, 1),
           title=title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def binned_recall_plot(binned: dict, path: str | Path, title: str = "") -> Path:
    """Recall@1 per equal-count uncertainty bin (0 = most certain), one line per signal.

    Args:
        binned: ``{signal: binned_recall(...)}``.
        path: the PNG to write.
        title: the figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in binned.items():
        ax.plot(np.arange(len(result["recall"])), result["recall"], marker="o",
                label=f"{name} (rho {result['spearman']:+.2f})")
    ax.set(xlabel="uncertainty bin (0 = most certain)", ylabel="Recall@1", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def risk_coverage_plot(curves: dict, path: str | Path, title: str = "") -> Path:
    """Risk (top-1 error rate) against coverage when the least certain queries are abstained on.

    Args:
        curves: ``{signal: (coverage, risk)}``.
        path: the PNG to write.
        title: the figure title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (coverage, risk) in curves.items():
        ax.plot(coverage, risk, label=f"{name} (AURC {np.mean(risk):.3f})")
    ax.set(xlabel="coverage", ylabel="risk (top-1 not relevant)", xlim=(0, 1), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_evaluation(evaluation, folder: str | Path, prefix: str, title: str = "") -> list[Path]:
    """The three figures of one :class:`~bayesretrieval.evaluation.report.Evaluation`.

    Writes ``{prefix}_reliability.png``, ``{prefix}_binned_recall.png`` and
    ``{prefix}_risk_coverage.png`` under ``folder``.

    Returns:
        The paths written.
    """
    folder = Path(folder)
    binned = {name: s["binned_recall@1"] for name, s in evaluation.summary["signals"].items()}
    return [
        reliability_diagram(evaluation.curves["reliability"], folder / f"{prefix}_reliability.png", title),
        binned_recall_plot(binned, folder / f"{prefix}_binned_recall.png", title),
        risk_coverage_plot(evaluation.curves["risk_coverage"], folder / f"{prefix}_risk_coverage.png", title),
    ]
