"""PNG plots for `trace-tables`: a metric against a swept setting, and a run's training curves.

The data come ready from render.py (Series, curve panels); this module only draws. matplotlib is imported
when a plot is asked for, through its object interface (no pyplot, no global backend or state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

STYLE = {  # how each kind of line is drawn: runs solid, the starting model dashed, the paper's dotted
    "run": dict(linestyle="-", marker="o"),
    "before": dict(linestyle="--", marker="s", color="0.5"),
    "paper": dict(linestyle=":", marker="D", fillstyle="none"),
}


class MatplotlibMissing(ImportError):
    """--plots without matplotlib installed."""


def require_matplotlib() -> Any:
    """matplotlib's Figure class, or a clear error saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MatplotlibMissing(
            "plots need matplotlib, which is not installed: pip install matplotlib "
            "(a dependency of trace-realign; reinstall the package to get it)") from exc
    return Figure


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_lines(series: Sequence[Any], x_key: str, metric: str, path: Path) -> Path:
    """Each series (tables.Series) as a line with 95 % error bars against x_key (a log axis for data sizes)."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for s in series:
        ax.errorbar(s.xs, s.ys, yerr=s.errs, capsize=3, label=s.label, **STYLE.get(s.kind, STYLE["run"]))
    if x_key == "data.size" and all(x > 0 for s in series for x in s.xs) and series:
        ax.set_xscale("log")  # sizes double or more between points
        ticks = sorted({x for s in series for x in s.xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    elif x_key == "shift" and series:  # shifts are counted: whole numbers only
        ticks = sorted({x for s in series for x in s.xs})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {x_key} (error bars: 95 % t-interval over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished runs to plot", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_curves(panels: Sequence[tuple[str, dict[str, list[tuple[float, float]]]]], title: str, path: Path) -> Path:
    """One run's training curves: a panel per group (loss terms, selection TPA, grad norm) against step."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(5.0 * len(panels), 3.6))
    for i, (name, curves) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                    label=key)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
