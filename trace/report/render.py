"""Rendering a report: markdown, CSV and LaTeX tables, and the data of its plots (plots.py draws them)."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from trace_realign.report.aggregate import (
    Paired,
    Report,
    Row,
    numeric,
    order_value,
    paper_label,
    setting_text,
    show_value,
)
from trace_realign.report.collect import Job, TablesError, method_of, seed_of, value_of

# ------------------------------------------------------------------------------------------ formatting


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.1f}" if abs(x) >= 10 or x == 0 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def cell_text(row: Row, metric: str) -> str:
    """'31.2 ± 4.1 [n=5]' (± the std over seeds); a paper number as '70.7 (paper)'; '' where it does not apply."""
    if row.kind == "paper":
        if metric not in row.reported:
            return ""
        value, pm = row.reported[metric]
        return f"{_num(value)}" + (f" ± {_num(float(pm))}" if pm is not None else "") + " (paper)"
    s = row.cells.get(metric)
    if s is None:
        return ""
    if s.n == 0:
        return "– [n=0]"
    # a run whose selection kept step 0 trained nothing that counts: its "after" is M_old, and says so
    kept = f"kept M_old on {row.kept_m_old} of {s.n}" if row.kept_m_old and metric.startswith("eval/after/") else ""
    if kept and row.kept_m_old == s.n:
        return f"kept M_old [n={s.n}]"
    if s.n == 1:
        return f"{_num(s.mean)} [n=1]"
    return f"{_num(s.mean)} ± {_num(s.std)} [n={s.n}" + (f"; {kept}" if kept else "") + "]"


def _decimals(*values: float) -> int:
    """Two decimals, or as many as give the largest of `values` two significant digits: a difference of a
    fraction (lm-eval's accuracy, +0.0040) keeps its digits, one of points reads as before."""
    scale = max((abs(v) for v in values if v and math.isfinite(v)), default=0.0)
    return 2 if scale == 0 else max(2, 1 - math.floor(math.log10(scale)))


def paired_text(p: Paired) -> str:
    """'+5.2 [+1.0, +9.4] n=3 *': the mean difference, its 95 % t-interval, pairs, and * when it excludes 0,
    all at the precision the numbers' scale needs (_decimals)."""
    d = p.diff
    if d.n == 0:
        return "– [n=0]"
    if d.n == 1:
        return f"{d.mean:+.{_decimals(d.mean)}f} [n=1]"
    k = _decimals(d.mean, d.low, d.high)
    return f"{d.mean:+.{k}f} [{d.low:+.{k}f}, {d.high:+.{k}f}] n={d.n}" + (" *" if p.significant else "")


def label_cells(row: Row, keys: Sequence[str]) -> list[str]:
    return [row.label if k == "method" else show_value(row.settings.get(k)) if k in row.settings else ""
            for k in keys]


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in line] for line in [list(header), *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in esc[1:]]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    """The main table, the paired table, the paper's own tables shown, and what failed or is missing."""
    parts = ["## Results", "", markdown_table(
        [*report.keys, *report.metrics],
        [[*label_cells(r, report.keys), *(cell_text(r, m) for m in report.metrics)] for r in report.rows])]
    parts += ["", "Cells: mean ± standard deviation over seeds [n seeds]; 95 % t-intervals in table.csv. "
                  "Rows marked `paper:` are the paper's reported numbers, not runs."]
    if report.paired:
        parts += ["", f"## Paired against {report.baseline} (difference by seed, 95 % t-interval, * excludes 0)", "",
                  markdown_table([*report.keys, *report.metrics],
                                 [[*label_cells(r, report.keys),
                                   *(paired_text(p[m]) if m in p else "" for m in report.metrics)]
                                  for r, p in report.paired])]
    elif report.baseline is None:
        parts += ["", "No paired table: no `trace` (or `full`) runs; name a baseline with --baseline."]
    for name, table in report.paper_tables.items():
        parts += ["", paper_markdown(name, table)]
    parts += ["", jobs_markdown(report.failed, report.unfinished)]
    if report.notes:
        parts += ["", "## Notes", "", *(f"- {n}" for n in report.notes)]
    return "\n".join(parts) + "\n"


def paper_markdown(name: str, table: dict[str, Any]) -> str:
    """A paper table as reported, every metric, marked as the paper's."""
    metric_names = list(table.get("metrics") or {})
    body = []
    for ref in table.get("rows", []):
        vals, pms = ref.get("values") or {}, ref.get("pm") or {}
        body.append([paper_label(ref, table)] + [
            "" if p not in vals else show_value(vals[p]) + (f" ± {pms[p]}" if p in pms else "")
            for p in metric_names])
    head = f"## Paper, {name}: {table.get('title', '')} ({table.get('source', '')})"
    extra = [f"Model: {table['model']}." if table.get("model") else "",
             f"Dataset: {table['dataset']}." if table.get("dataset") else "", table.get("note", "")]
    return "\n".join([head, "", markdown_table(["method", *metric_names], body)]
                     + (["", " ".join(e for e in extra if e)] if any(extra) else []))


def jobs_markdown(failed: Sequence[Job], unfinished: Sequence[Job]) -> str:
    """The jobs no cell counts: each failed one with the first line of its FAILED, each unfinished one."""
    if not failed and not unfinished:
        return "All jobs finished."
    lines = [f"## Jobs not counted ({len(failed)} failed, {len(unfinished)} unfinished)", ""]
    lines += [f"- failed: {j.path} ({method_of(j)}, seed {seed_of(j)}): {j.failed}" for j in failed]
    lines += [f"- unfinished (no metrics.json, no FAILED): {j.path} ({method_of(j)}, seed {seed_of(j)})"
              for j in unfinished]
    return "\n".join(lines)


def _csv_float(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x))


def render_csv(report: Report) -> str:
    """One line per row × metric: mean, std, n, ci95 (half-width), low, high, min, max, the seeds; a paper
    row's reported value in mean and its ± in paper_pm."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "kind", *report.keys, "metric", "mean", "std", "n", "ci95", "low", "high", "min", "max",
                "paper_pm", "seeds"])
    for r in report.rows:
        labels = label_cells(r, report.keys)
        for m in report.metrics:
            if r.kind == "paper":
                if m in r.reported:
                    value, pm = r.reported[m]
                    w.writerow([r.label, r.kind, *labels, m, _csv_float(value), "", "", "", "", "", "", "",
                                _csv_float(pm), ""])
                continue
            s = r.cells.get(m)
            if s is None:
                continue
            seeds = " ".join(str(k) for k in sorted(r.per_seed.get(m, {}), key=order_value))
            w.writerow([r.label, r.kind, *labels, m, *(_csv_float(x) for x in (s.mean, s.std)), s.n,
                        *(_csv_float(x) for x in (s.ci95, s.low, s.high, s.min, s.max)), "", seeds])
    return buf.getvalue()


def render_paired_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "kind", *report.keys, "baseline", "metric", "n_pairs", "mean_diff", "std_diff", "ci95",
                "low", "high", "significant", "seeds"])
    for r, result in report.paired:
        for m, p in result.items():
            d = p.diff
            w.writerow([r.label, r.kind, *label_cells(r, report.keys), report.baseline, m, d.n,
                        *(_csv_float(x) for x in (d.mean, d.std, d.ci95, d.low, d.high)), int(p.significant),
                        " ".join(map(str, p.seeds))])
    return buf.getvalue()


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(TEX_SPECIAL.get(c, c) for c in str(text))


def tex_cell(row: Row, metric: str) -> str:
    text = cell_text(row, metric)
    if not text:
        return ""
    text = tex_escape(text).replace("±", r"$\pm$").replace("–", "--")
    return r"\textit{" + text + "}" if row.kind == "paper" else text


def render_latex(report: Report) -> str:
    """The main table as a booktabs tabular (\\usepackage{booktabs}); the paper's rows in italics."""
    spec = "l" * len(report.keys) + "r" * len(report.metrics)
    head = " & ".join(tex_escape(h) for h in [*report.keys, *report.metrics])
    lines = ["% trace-tables: mean $\\pm$ std over seeds (n seeds); needs \\usepackage{booktabs}",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule", head + r" \\", r"\midrule"]
    for r in report.rows:
        labels = [tex_escape(c).replace("—", "--") for c in label_cells(r, report.keys)]
        lines.append(" & ".join([*labels, *(tex_cell(r, m) for m in report.metrics)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_outputs(report: Report, out: Path, formats: Sequence[str]) -> list[Path]:
    """table.md / table.csv (+ paired.csv) / table.tex in `out`, as asked."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    files = {"md": [("table.md", render_markdown)], "tex": [("table.tex", render_latex)],
             "csv": [("table.csv", render_csv)] + ([("paired.csv", render_paired_csv)] if report.paired else [])}
    for fmt in formats:
        for name, render in files[fmt]:
            (out / name).write_text(render(report), encoding="utf-8")
            written.append(out / name)
    return written


# ---------------------------------------------------------------------------------------- plots' data


@dataclass
class Series:
    """One line of a plot: x, mean, the 95 % half-width (0 where it has none), and its kind."""

    label: str
    kind: str
    xs: list[float]
    ys: list[float]
    errs: list[float]


def plot_metric(report: Report) -> str | None:
    """The metric the setting plots show: the first TPA column, else the first column."""
    first = report.metrics[0] if report.metrics else None
    return next((m for m in report.metrics if m.startswith("eval/after/tpa")), first)


def line_series(report: Report, x_key: str, metric: str) -> list[Series]:
    """Per method (and each value of the other settings), the metric against x_key, sorted by x. The
    paper's rows that report the metric at a value of x_key join as their own lines."""
    lines: dict[tuple, Series] = {}
    for r in report.rows:
        x = numeric(r.settings.get(x_key))
        if x is None:
            continue
        if r.kind == "paper":
            if metric not in r.reported:
                continue
            y, err, label = r.reported[metric][0], 0.0, r.line
        else:
            s = r.cells.get(metric)
            if s is None or s.n == 0:
                continue
            y, err = s.mean, (0.0 if math.isnan(s.ci95) else s.ci95)
            others = {k: v for k, v in r.settings.items() if k not in (x_key, "method")}
            label = r.label + (" " + setting_text(others).strip() if others else "")
        line = lines.setdefault((r.kind, label), Series(label, r.kind, [], [], []))
        line.xs.append(x)
        line.ys.append(y)
        line.errs.append(err)
    for line in lines.values():
        order = sorted(range(len(line.xs)), key=lambda i: line.xs[i])
        line.xs, line.ys, line.errs = ([v[i] for i in order] for v in (line.xs, line.ys, line.errs))
    return list(lines.values())


def read_curves(text: str) -> dict[str, list[tuple[float, float]]]:
    """Lightning's CSVLogger metrics.csv as {column: [(step, value), ...]}; blank cells are skipped (each
    row holds what was logged at that step)."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "step" not in reader.fieldnames:
        raise TablesError("metrics.csv has no `step` column")
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in reader:
        step = _float_or_none(line.get("step"))
        if step is None:
            continue
        for key, raw in line.items():
            value = _float_or_none(raw)
            if key not in ("step", "epoch") and value is not None:
                curves.setdefault(key, []).append((step, value))
    return curves


def _float_or_none(raw: Any) -> float | None:
    try:
        return float(raw) if raw not in (None, "") else None
    except ValueError:
        return None


CURVE_PANELS = (
    ("loss terms", lambda k: k.startswith("train/loss") and not k.startswith("train/first_")),
    ("selection TPA", lambda k: k.startswith("select/")),
    ("grad norm", lambda k: k == "train/grad_norm"),
)


Curves = dict[str, list[tuple[float, float]]]


def curve_panels(curves: Curves) -> list[tuple[str, Curves]]:
    """The training-curve panels a run's metrics.csv can fill: loss terms, selection TPA, grad norm."""
    panels = []
    for title, wanted in CURVE_PANELS:
        chosen = {k: v for k, v in sorted(curves.items()) if wanted(k)}
        if chosen:
            panels.append((title, chosen))
    return panels


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_") or "run"


def make_plots(report: Report, jobs: Sequence[Job], out: Path) -> tuple[list[Path], list[str]]:
    """(a) the metric against data.size, (b) against data.label_noise, where they vary, and (c) each run's
    training curves from csv/metrics.csv. Returns the PNGs and notes on what could not be drawn."""
    from trace_realign.report import plots

    plots.require_matplotlib()
    written, notes = [], []
    metric = plot_metric(report)
    for x_key, name in (("data.size", "data_size"), ("data.label_noise", "label_noise")):
        if metric is None or x_key not in report.keys:
            continue
        series = line_series(report, x_key, metric)
        path = out / f"{_slug(metric.replace('eval/after/', ''))}_vs_{name}.png"
        written.append(plots.plot_lines(series, x_key, metric, path))
    used: set[str] = set()
    for j in jobs:
        csv_path = Path(j.path) / "csv" / "metrics.csv"
        if j.status != "finished" or not csv_path.is_file():
            continue
        panels = curve_panels(read_curves(csv_path.read_text(encoding="utf-8")))
        if not panels:
            notes.append(f"{csv_path}: no loss, selection or grad-norm columns to plot")
            continue
        settings = {k: value_of(j, k) for k in report.keys if k != "method"}
        title = f"{method_of(j)} {setting_text(settings)}seed {seed_of(j)}"
        stem = _slug(f"curves_{method_of(j)}_{setting_text(settings)}seed{seed_of(j)}")
        stem = stem if stem not in used else _slug(f"{stem}_{Path(j.path).name}_{j.order}")
        used.add(stem)
        written.append(plots.plot_curves(panels, title, out / f"{stem}.png"))
    return written, notes


