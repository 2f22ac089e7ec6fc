"""Successive policy shifts in `trace-tables`: a chain's run folder (shifts=chain or direct) read as one job
per shift, the drift of agreement with every policy of the chain across shifts, and each chain's last shift
against the same method reaching the last policy in one shift (shifts=direct), paired by seed.

A chain job holds each shift's metrics under shift<k>/ (trace_realign/method/shifts.py). Shift k becomes a
job of its own with the setting `shift` = k; shift 0 is the model the chain started from (shift 1's
evaluation before training), so a drift line starts where the method started.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from trace_realign.method.shifts import policy_label
from trace_realign.report.aggregate import Paired, Report, Summary, build_report, order_value, paired
from trace_realign.report.collect import Job, method_of, seed_of
from trace_realign.report.render import Series, label_cells, markdown_table, paired_text

SHIFT = "shift"
CHAIN = "shifts.count"  # how many shifts the job's chain made (1: shifts=direct)
NOT_AXES = {"shifted", "unchanged", "invert", "punish", "retain", "undecided"}  # TPA's other groups


def is_chain(job: Job) -> bool:
    return job.status == "finished" and "shifts/count" in (job.metrics or {})


def expand_shifts(jobs: Sequence[Job]) -> list[Job]:
    """Every finished chain job as one job per shift (0: its starting model); other jobs as they are."""
    out: list[Job] = []
    for job in jobs:
        if not is_chain(job):
            out.append(job)
            continue
        metrics = job.metrics or {}
        count = int(metrics["shifts/count"])
        for k in range(count + 1):
            if k == 0:  # the starting model, as shift 1 measured it before training
                own = {key.replace("shift1/eval/before/", "eval/after/", 1): v for key, v in metrics.items()
                       if key.startswith("shift1/eval/before/")}
            else:
                own = {key[len(f"shift{k}/"):]: v for key, v in metrics.items() if key.startswith(f"shift{k}/")}
            overrides = None if job.overrides is None else {**job.overrides, SHIFT: k}
            out.append(replace(job, config={**job.config, SHIFT: k, CHAIN: count}, overrides=overrides, metrics=own))
    return out


def chain_length(job: Job) -> int:
    return int(job.config.get(CHAIN, 0))


def policy_labels(jobs: Sequence[Job]) -> list[str]:
    """Every policy the chains report agreement with (agree_<label>): in chain order (the dataset's
    policy_old, then shifts.policies), then any other the metrics name."""
    chained = [policy_label(str(p)) for j in jobs for p in [j.config.get("dataset.policy_old"), *(j.config.get("shifts.policies") or [])]
               if p is not None]
    found = [k.split("/")[2][len("agree_"):] for j in jobs for k in (j.metrics or {})
             if k.startswith("eval/after/agree_") and k.count("/") == 2 and "_ci95" not in k]
    return [label for label in dict.fromkeys(chained + found) if label in found]


def axes_of(jobs: Sequence[Job], label: str) -> list[str]:
    prefix = f"eval/after/agree_{label}/"
    found = {k[len(prefix):] for j in jobs for k in (j.metrics or {}) if k.startswith(prefix)}
    return sorted(found - NOT_AXES)


def agreement_metrics(jobs: Sequence[Job], label: str) -> list[str]:
    return [f"eval/after/agree_{label}"] + [f"eval/after/agree_{label}/{a}" for a in axes_of(jobs, label)]


def drift_reports(jobs: Sequence[Job]) -> dict[str, Report]:
    """For each policy the chains name: agreement with it after each shift, overall and per axis."""
    shifts = [j for j in jobs if SHIFT in j.config]
    return {label: build_report(shifts, agreement_metrics(shifts, label), rows_key=SHIFT, paper=["none"])
            for label in policy_labels(shifts)}


def target_of(job: Job) -> str | None:
    """The policy a chain job's last shift realigned to (its last agreement label is not it: read the config)."""
    names = job.config.get("shifts.policies")
    return policy_label(str(names[-1])) if isinstance(names, list) and names else None


def chain_against_direct(jobs: Sequence[Job]) -> list[tuple[str, str, Paired]]:
    """(method, metric, paired difference): each method's last chained shift minus the same method reaching
    the same policy in one shift (shifts=direct), by seed, on agreement with that policy overall and per axis."""
    shifts = [j for j in jobs if SHIFT in j.config and j.status == "finished"]
    out = []
    for method in dict.fromkeys(method_of(j) for j in shifts):
        mine = [j for j in shifts if method_of(j) == method]
        chained = [j for j in mine if chain_length(j) >= 2 and j.config[SHIFT] == chain_length(j)]
        for target in dict.fromkeys(t for t in map(target_of, chained) if t):
            a_jobs = {seed_of(j): j for j in chained if target_of(j) == target}
            b_jobs = {seed_of(j): j for j in mine if chain_length(j) == 1 and j.config[SHIFT] == 1 and target_of(j) == target}
            if not b_jobs:
                continue
            for m in agreement_metrics(mine, target):
                a = {s: float(j.metrics[m]) for s, j in a_jobs.items() if m in (j.metrics or {})}
                b = {s: float(j.metrics[m]) for s, j in b_jobs.items() if m in (j.metrics or {})}
                out.append((method, m, paired(a, b)))
    return out


def interval_text(s: Summary | None) -> str:
    """'52.4 [47.1, 57.7] n=3 min 49.0': the mean, its 95 % t-interval, the seeds and the lowest of them."""
    if s is None or s.n == 0:
        return "—"
    if s.n == 1:
        return f"{s.mean:.1f} n=1"
    return f"{s.mean:.1f} [{s.low:.1f}, {s.high:.1f}] n={s.n} min {s.min:.1f}"


def render_drift(jobs: Sequence[Job]) -> str:
    """The drift tables (one per policy of the chains) and the chain-against-direct comparison, markdown."""
    parts = ["# Agreement with each policy across successive shifts",
             "",
             "Shift 0 is the model each chain started from; shift k the model after the k-th realignment. "
             "Cells: the mean over seeds [its 95 % t-interval] (n seeds; the lowest seed after `min`)."]
    for label, report in drift_reports(jobs).items():
        metrics = report.metrics
        header = [*report.keys, *(m.rsplit("/", 1)[-1] if m.count("/") > 2 else "all" for m in metrics)]
        # a row that never measured this policy (a direct shift skips the middle one) is left out
        body = [[*label_cells(r, report.keys), *(interval_text(r.cells.get(m)) for m in metrics)]
                for r in report.rows if r.kind == "run" and any((c := r.cells.get(m)) and c.n for m in metrics)]
        parts += ["", f"## Agreement with {label}", "", markdown_table(header, body).rstrip()]
    pairs = chain_against_direct(jobs)
    if pairs:
        parts += ["", "## The chain's last shift against the same policy reached in one shift",
                  "", "Chain minus direct, paired by seed: mean [95 % t-interval] n (* when it excludes 0).", "",
                  "| method | metric | chain − direct |", "|---|---|---|"]
        parts += [f"| {method} | {metric.replace('eval/after/', '')} | {paired_text(p)} |" for method, metric, p in pairs]
    return "\n".join(parts) + "\n"


def drift_series(report: Report, metric: str) -> list[Series]:
    """Agreement against the shift, one line per method and chain kind."""
    lines: dict[str, Series] = {}
    for r in report.rows:
        s = r.cells.get(metric)
        if r.kind != "run" or s is None or s.n == 0 or SHIFT not in r.settings:
            continue
        others = {k: v for k, v in r.settings.items() if k not in (SHIFT, "method")}
        label = r.label + "".join(f" {v}" for v in others.values())
        line = lines.setdefault(label, Series(label, "run", [], [], []))
        line.xs.append(float(r.settings[SHIFT]))
        line.ys.append(s.mean)
        line.errs.append(0.0 if math.isnan(s.ci95) else s.ci95)
    for line in lines.values():
        order = sorted(range(len(line.xs)), key=lambda n: order_value(line.xs[n]))
        line.xs, line.ys, line.errs = ([v[n] for n in order] for v in (line.xs, line.ys, line.errs))
    return list(lines.values())


def write_drift(jobs: Sequence[Job], out: Path, plots: bool) -> list[Path]:
    """drift.md, and with plots one PNG per policy: agreement with it against the shift."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "drift.md"]
    written[0].write_text(render_drift(jobs), encoding="utf-8")
    if plots:
        from trace_realign.report import plots as draw

        for label, report in drift_reports(jobs).items():
            metric = f"eval/after/agree_{label}"
            written.append(draw.plot_lines(drift_series(report, metric), SHIFT, metric, out / f"agree_{label}_vs_shift.png"))
    return written


def has_chains(jobs: Sequence[Job]) -> bool:
    return any(SHIFT in j.config for j in jobs)
