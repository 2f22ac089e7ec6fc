"""Aggregating jobs into `trace-tables`' report: rows of a method in one setting of the other varying keys,
each cell the seeds' mean, standard deviation, 95 % t-interval and extremes; each row paired by seed with
the baseline method; the paper's numbers as marked reference rows. Plain data in, plain data out, testable
without files (the grouping rules are in trace_realign.tables' docstring)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trace_realign.core.rundir import volatile
from trace_realign.report.collect import (
    BASELINES,
    BEFORE,
    DEFAULT_METRICS,
    METHOD_KEYS,
    Job,
    TablesError,
    method_of,
    read_yaml,
    seed_of,
    value_of,
)

# ---------------------------------------------------------------------------------------------- statistics


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)  # the fraction converges fast only below the mean
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom, t >= 0."""
    return 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (0.5 <= p < 1), solved on the upper tail by bisection to the last bit."""
    if not 0.5 <= p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df > 0, got p={p}, df={df}")
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_upper_tail(hi, df) > tail:
        lo, hi = hi, 2.0 * hi
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if t_upper_tail(mid, df) > tail:
            lo = mid
        else:
            hi = mid


# t_{0.975, df} for df = 1..30 correctly rounded (computed at 50 digits): the seed counts sweeps use get
# the exact double; larger df are computed (t_quantile, good to about 1e-15).
T975 = (
    12.706204736174705, 4.302652729749464, 3.1824463052837095, 2.7764451051977943, 2.5705818356363155,
    2.44691185114497, 2.3646242515927853, 2.3060041352041667, 2.2621571627982053, 2.228138851986275,
    2.2009851600916397, 2.178812829667229, 2.1603686564627926, 2.144786687917804, 2.1314495455597755,
    2.1199052992212546, 2.109815577833317, 2.1009220402410387, 2.0930240544083096, 2.085963447265865,
    2.0796138447276804, 2.0738730679040263, 2.0686576104190486, 2.063898561628026, 2.0595385527532977,
    2.055529438642873, 2.0518305164802855, 2.048407141795245, 2.0452296421327043, 2.042272456301238,
)


def t975(df: int) -> float:
    """t_{0.975, df}: the factor of a two-sided 95 % t-interval's half-width."""
    if df < 1:
        raise ValueError(f"t975: df must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else t_quantile(0.975, df)


@dataclass(frozen=True)
class Summary:
    """Seeds of one cell: n, mean, sample standard deviation, half-width of the 95 % t-interval, extremes.
    std and ci95 are NaN below two values; every field but n is NaN for none."""

    n: int
    mean: float
    std: float
    ci95: float
    min: float
    max: float

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std (n - 1), n, the 95 % t-interval's half-width t_{0.975,n-1} * std / sqrt(n), min, max."""
    n = len(values)
    if n == 0:
        return Summary(0, *(math.nan,) * 5)
    mean = math.fsum(values) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, values[0], values[0])
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Summary(n, mean, std, t975(n - 1) * std / math.sqrt(n), min(values), max(values))


@dataclass(frozen=True)
class Paired:
    """A row against the baseline over the seeds both have: the differences' summary and whether the 95 %
    interval excludes 0."""

    diff: Summary
    seeds: tuple[Any, ...]
    significant: bool


def paired(row: dict[Any, float], baseline: dict[Any, float]) -> Paired:
    """Row minus baseline, paired by seed (only the seeds both have)."""
    seeds = tuple(sorted((s for s in row if s in baseline), key=order_value))
    diff = summarize([row[s] - baseline[s] for s in seeds])
    significant = diff.n >= 2 and not math.isnan(diff.ci95) and (diff.low > 0 or diff.high < 0)
    return Paired(diff, seeds, significant)


# --------------------------------------------------------------------------------------------- grouping


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def order_value(value: Any) -> tuple:
    """Sort key mixing None, numbers and strings: None first, numbers by value, then text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def _ignored(key: str) -> bool:
    """Keys that never make a setting: the seed, the method itself, Hydra's own and volatile settings."""
    return key == "seed" or key in METHOD_KEYS or key.startswith("hydra") or volatile(key)


def _values(jobs: Sequence[Job], key: str, source: str) -> list[Any]:
    return [_hashable(value_of(j, key, source)) for j in jobs]


def _determined(jobs: Sequence[Job], by: str, key: str, source: str) -> bool:
    """Whether `key` takes one value for each value of `by` (then it adds nothing to the row label)."""
    seen: dict[Any, Any] = {}
    for a, b in zip(_values(jobs, by, source), _values(jobs, key, source)):
        if seen.setdefault(a, b) != b:
            return False
    return True


def setting_keys(jobs: Sequence[Job]) -> tuple[list[str], str]:
    """The keys that vary between the jobs, besides seed and method, and where they were read from:
    "overrides" when every job has .hydra/overrides.yaml, else "config" (run.json)."""
    source = "overrides" if jobs and all(j.overrides is not None for j in jobs) else "config"
    ordered: dict[str, None] = {}
    for j in jobs:
        for k in (j.overrides if source == "overrides" else sorted(j.config)):
            if not _ignored(k):
                ordered.setdefault(k, None)
    varying = [k for k in ordered if len(set(_values(jobs, k, source))) > 1]
    if source == "overrides":
        return varying, source
    return _reduce_config_keys(jobs, varying), source


def _per_run_path(jobs: Sequence[Job], key: str) -> bool:
    """A folder of each run's own (trainer.default_root_dir = the output folder): a path that names the run
    folder, or a *dir / *path key with a different value in every run. Where a run works, not what."""
    values = [j.config.get(key) for j in jobs]
    if not all(isinstance(v, str) for v in values):
        return False
    if all(str(Path(j.path)) in v or Path(v).name == Path(j.path).name and "/" in v for j, v in zip(jobs, values)):
        return True
    return key.rsplit(".", 1)[-1].endswith(("dir", "path")) and len(set(values)) == len(values)


def _reduce_config_keys(jobs: Sequence[Job], keys: list[str]) -> list[str]:
    """Config keys that vary carry much that is implied: the method's own fields, a key that copies the
    seed, every field of a model chosen by name. Keep one key per group (a `.name` first) and drop the
    keys the kept ones determine."""
    seeds = [seed_of(j) for j in jobs]
    keys = [k for k in keys if not all(s is not None and j.config.get(k) == s for j, s in zip(jobs, seeds))]
    keys = [k for k in keys if not _per_run_path(jobs, k)]
    keys = [k for k in keys if not (k.split(".")[0] in METHOD_KEYS and _determined(jobs, "method", k, "config"))]
    priority = sorted(keys, key=lambda k: (not k.endswith((".name", ".name_or_path")), k.count("."), k))
    kept: list[str] = []
    for k in priority:
        top = k.split(".")[0]
        if not any(kk.split(".")[0] == top and _determined(jobs, kk, k, "config") for kk in kept):
            kept.append(k)
    return [k for k in keys if k in kept]


# ---------------------------------------------------------------------------------------------- the report


@dataclass
class Row:
    """One table row: a method in one setting (kind "run"), the starting model (kind "before"), or a
    number the paper reports (kind "paper"). `per_seed` holds each metric's value per seed; `cells` the
    summaries (None where the metric does not apply); `reported` a paper row's (value, ±) per metric."""

    kind: str
    method: str
    settings: dict[str, Any]
    per_seed: dict[str, dict[Any, float]] = field(default_factory=dict)
    cells: dict[str, Summary | None] = field(default_factory=dict)
    reported: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    rank: float = 0.0
    jobs: list[str] = field(default_factory=list)
    line: str = ""  # a paper row's name across the values of a plotted setting (its label less `data`)
    kept_m_old: int = 0  # seeds whose selection kept step 0: their "after" numbers are M_old's

    @property
    def label(self) -> str:
        if self.kind == BEFORE:
            return "before (M_old)"
        return self.method


@dataclass
class Report:
    """Everything the tables show, as plain data."""

    metrics: list[str]
    keys: list[str]  # the row-label column first ("method" or a setting), then the other settings
    rows: list[Row]
    baseline: str | None
    paired: list[tuple[Row, dict[str, Paired]]]
    failed: list[Job]
    unfinished: list[Job]
    notes: list[str]
    paper_tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def available_metrics(jobs: Sequence[Job]) -> list[str]:
    """The numeric metric keys any finished run has."""
    keys = {k for j in jobs if j.status == "finished" for k, v in (j.metrics or {}).items() if numeric(v) is not None}
    return sorted(keys)


def choose_metrics(jobs: Sequence[Job], requested: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The metrics to show and notes. A requested key no run has is an error naming the keys there are;
    a default key no run has is left out with a note."""
    have = available_metrics(jobs)
    if requested:
        missing = [k for k in requested if k not in have]
        if missing:
            hints = sorted({m for k in missing for m in difflib.get_close_matches(k, have, n=4, cutoff=0.5)})
            some = hints or [k for k in have if k.startswith("eval/after/")][:8] or have[:8]
            raise TablesError(f"no run has the metric{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                              f"{'close' if hints else 'some'} keys the runs have: {', '.join(some)} "
                              f"({len(have)} in all)")
        return list(dict.fromkeys(requested)), []
    declared = [c for j in jobs if j.report for c in (j.report.get("columns") or [])]
    if declared:
        # the columns the experiment declares, measured or not: a column whose evaluator these runs did not
        # have stays in the table, empty, and says so
        chosen = list(dict.fromkeys(declared))
        notes = [f"column {k}: not measured by these runs" for k in chosen if k not in have]
        return chosen, notes
    chosen = [k for k in DEFAULT_METRICS if k in have]
    dropped = [k for k in DEFAULT_METRICS if k not in have]
    notes = [f"default metric {k}: no finished run has it; left out" for k in dropped]
    return chosen, notes


def before_key(metric: str) -> str | None:
    """The starting model's key for an after-realignment metric (eval/after/x -> eval/before/x)."""
    return "eval/before/" + metric[len("eval/after/"):] if metric.startswith("eval/after/") else None


def _seed_id(job: Job) -> Any:
    """The seed pairs runs; a run without one stands alone (never paired)."""
    seed = seed_of(job)
    return seed if seed is not None else f"(no seed: {job.path})"


def group_jobs(jobs: Sequence[Job], keys: list[str], source: str) -> dict[tuple, list[Job]]:
    """Jobs by (method, setting values), in the order first met."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((method_of(j), *(_hashable(value_of(j, k, source)) for k in keys)), []).append(j)
    return groups


def run_row(method: str, settings: dict[str, Any], jobs: Sequence[Job], metrics: Sequence[str],
            notes: list[str]) -> Row:
    """A method's row: per metric, the value of each finished job by seed. Two finished runs of the same
    setting and seed are an error (which would count?)."""
    row = Row("run", method, settings, jobs=[j.path for j in jobs])
    finished = [j for j in jobs if j.status == "finished"]
    by_seed: dict[Any, Job] = {}
    for j in finished:
        other = by_seed.setdefault(_seed_id(j), j)
        if other is not j:
            raise TablesError(f"two finished runs of {method} {setting_text(settings)}with seed {seed_of(j)}: "
                              f"{other.path} and {j.path}; pass only one of them")
    row.kept_m_old = sum(j.metrics.get("select/best_step") == 0 for j in by_seed.values())  # type: ignore[union-attr]
    for m in metrics:
        values = {s: numeric(j.metrics.get(m)) for s, j in by_seed.items()}  # type: ignore[union-attr]
        lacking = [by_seed[s].path for s, v in values.items() if v is None]
        if lacking and len(lacking) < len(values):
            notes.append(f"{method} {setting_text(settings)}: {m} missing in {len(lacking)} finished run(s): "
                         + ", ".join(lacking))
        row.per_seed[m] = {s: v for s, v in values.items() if v is not None}
        row.cells[m] = summarize(list(row.per_seed[m].values()))
    return row


def before_row(settings: dict[str, Any], jobs: Sequence[Job], metrics: Sequence[str], notes: list[str]) -> Row | None:
    """M_old's row for one setting, from eval/before/* of its finished runs: the runs of one seed share
    M_old, so each seed counts once (their mean, with a note if they disagree)."""
    row = Row(BEFORE, BEFORE, settings, rank=-2)
    found = False
    for m in metrics:
        key = before_key(m)
        if key is None:
            row.cells[m] = None
            continue
        seen: dict[Any, list[float]] = {}
        for j in jobs:
            v = numeric((j.metrics or {}).get(key)) if j.status == "finished" else None
            if v is not None:
                seen.setdefault(_seed_id(j), []).append(v)
        for seed, vs in seen.items():
            if max(vs) - min(vs) > 1e-9:
                notes.append(f"before {setting_text(settings)}: {key} differs between the runs of seed {seed} "
                             f"({', '.join(f'{v:g}' for v in vs)}); their mean is shown")
        row.per_seed[m] = {s: math.fsum(vs) / len(vs) for s, vs in seen.items()}
        row.cells[m] = summarize(list(row.per_seed[m].values()))
        found = found or bool(seen)
    return row if found else None


def show_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, tuple):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    return str(v)


def setting_text(settings: dict[str, Any]) -> str:
    shown = {k: v for k, v in settings.items() if k != "method"}
    return "(" + ", ".join(f"{k}={show_value(v)}" for k, v in shown.items()) + ") " if shown else ""


def choose_baseline(methods: Sequence[str], requested: str | None) -> str | None:
    if requested:
        if requested not in methods:
            raise TablesError(f"--baseline {requested}: no such method among the runs ({', '.join(methods)})")
        return requested
    return next((b for b in BASELINES if b in methods), None)


def pair_rows(rows: Sequence[Row], baseline: str | None, metrics: Sequence[str],
              notes: list[str]) -> list[tuple[Row, dict[str, Paired]]]:
    """Each run or before row against the baseline row of the same setting, metric by metric."""
    if baseline is None:
        return []
    bases = {_hashable(r.settings): r for r in rows if r.kind == "run" and r.method == baseline}
    out = []
    for r in rows:
        if r.kind == "paper" or (r.kind == "run" and r.method == baseline):
            continue
        base = bases.get(_hashable(r.settings))
        if base is None:
            notes.append(f"{r.label} {setting_text(r.settings)}: no {baseline} runs in this setting to pair with")
            continue
        result = {}
        for m in metrics:
            if r.cells.get(m) is None:
                continue
            result[m] = paired(r.per_seed.get(m, {}), base.per_seed.get(m, {}))
            alone = sorted((set(r.per_seed.get(m, {})) ^ set(base.per_seed.get(m, {}))), key=order_value)
            if alone:
                notes.append(f"{r.label} vs {baseline} {setting_text(r.settings)}on {m}: seed(s) "
                             f"{', '.join(map(str, alone))} in only one of the two, left out of the pairing")
        out.append((r, result))
    return out


def build_report(
    jobs: Sequence[Job],
    metrics: Sequence[str] | None = None,
    rows_key: str | None = None,
    baseline: str | None = None,
    paper: Sequence[str] | None = None,
    paper_data: dict[str, Any] | None = None,
) -> Report:
    """The tables from the jobs: rows, their cells, the pairing against the baseline, what failed and is
    missing, and the paper's reference rows (`paper`: table keys; "none" turns off those the runs' task
    names would show)."""
    if not jobs:
        raise TablesError("no run folders given")
    notes: list[str] = []
    chosen, dropped = choose_metrics(jobs, metrics)
    notes += dropped
    keys, source = setting_keys(jobs)
    groups = group_jobs(jobs, keys, source)
    method_rank = {m: i for i, m in enumerate(dict.fromkeys(g[0] for g in groups))}
    base = choose_baseline(list(method_rank), baseline)
    if base is not None:
        method_rank[base] = -1
    rows: list[Row] = []
    for (method, *values), members in groups.items():
        row = run_row(method, dict(zip(keys, values)), members, chosen, notes)
        row.rank = method_rank[method]
        rows.append(row)
    by_setting: dict[tuple, list[Job]] = {}
    for (_, *values), members in groups.items():
        by_setting.setdefault(tuple(values), []).extend(members)
    for values, members in by_setting.items():
        row = before_row(dict(zip(keys, values)), members, chosen, notes)
        if row is not None:
            rows.append(row)
    label_keys = ["method", *keys]
    if rows_key and rows_key != "method":
        if rows_key not in keys:
            raise TablesError(f"--rows {rows_key}: not a setting that varies between these runs "
                              f"(they vary: {', '.join(['method', *keys])})")
        label_keys = [rows_key, "method", *(k for k in keys if k != rows_key)]
    paper_data = paper_data or load_paper()
    tables = {name: paper_data["tables"][name] for name in paper_tables_for(jobs, paper, paper_data)}
    for name, table in tables.items():
        rows += reference_rows(name, table, jobs, keys, source, chosen, method_rank, notes)
    rows.sort(key=lambda r: row_sort_key(r, label_keys))
    return Report(
        metrics=chosen, keys=label_keys, rows=rows, baseline=base,
        paired=pair_rows(rows, base, chosen, notes),
        failed=[j for j in jobs if j.status == "failed"],
        unfinished=[j for j in jobs if j.status == "unfinished"],
        notes=notes, paper_tables=tables,
    )


def row_sort_key(row: Row, label_keys: Sequence[str]) -> tuple:
    """Rows by their label columns; within a setting, before, then the baseline, the methods in sweep
    order, the paper's rows last (also last where they leave a setting unsaid)."""
    parts = []
    for k in label_keys:
        if k == "method":
            parts.append((row.rank,))
        elif row.kind == "paper" and k not in row.settings:
            parts.append((9,))
        else:
            parts.append(order_value(_hashable(row.settings.get(k))))
    return tuple(parts)


# ---------------------------------------------------------------------------------------- paper numbers


# the paper's own numbers, shown as marked reference rows
PAPER_FILE = Path(__file__).with_name("paper_results.yaml")


def load_paper(path: Path = PAPER_FILE) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("tables"), dict):
        raise TablesError(f"{path}: expected a mapping with `tables`")
    return data


def paper_tables_for(jobs: Sequence[Job], requested: Sequence[str] | None,
                     paper_data: dict[str, Any] | None = None) -> list[str]:
    """The paper tables to show: those asked for, and those the runs' task names name (table4_ablation ->
    table4), unless "none" is asked for."""
    known = (paper_data or load_paper())["tables"]
    asked = [t for t in (requested or [])]
    if "none" in asked:
        return []
    unknown = [t for t in asked if t not in known]
    if unknown:
        raise TablesError(f"--paper {', '.join(unknown)}: no such table; the paper's tables here: {', '.join(known)}")
    named = []
    for j in jobs:
        if j.report and j.report.get("table") in known:  # the experiment names its paper table
            named.append(j.report["table"])
            continue
        task = j.task_name or ""
        for candidate in (task, task.split("_")[0]):
            if candidate in known:
                named.append(candidate)
                break
    return list(dict.fromkeys([*asked, *named]))


def _same(a: Any, b: Any) -> bool:
    na, nb = numeric(a), numeric(b)
    if na is not None and nb is not None:
        return math.isclose(na, nb, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def reference_rows(name: str, table: dict[str, Any], jobs: Sequence[Job], keys: Sequence[str], source: str,
                   metrics: Sequence[str], method_rank: dict[str, int], notes: list[str]) -> list[Row]:
    """The paper table's rows whose setting (e.g. data.size: 5000) the runs have, in the columns their
    metric maps to. The rows it leaves out and the metrics no column shows are noted."""
    maps = {p: (spec or {}).get("maps_to") for p, spec in (table.get("metrics") or {}).items()}
    # a printed number times `scale` is in the units of its column (the paper's 70.6 % is lm-eval's 0.706)
    scales = {p: float((spec or {}).get("scale", 1.0)) for p, spec in (table.get("metrics") or {}).items()}
    shown_metrics = [p for p, m in maps.items() if m in metrics]
    if not shown_metrics:
        notes.append(f"paper {name}: none of its metrics ({', '.join(maps)}) is a column here; see its own table")
        return []
    out, skipped = [], []
    for ref in table.get("rows", []):
        if not any(p in (ref.get("values") or {}) for p in shown_metrics):
            continue  # it reports nothing these columns show (its own table shows it)
        setting = ref.get("setting") or {}
        have = {k: {_hashable(value_of(j, k, source)) for j in jobs} for k in setting}
        if not all(any(_same(v, h) for h in have[k]) for k, v in setting.items()):
            skipped.append(ref)
            continue
        row = Row("paper", paper_label(ref, table), dict(setting), line=paper_label({**ref, "data": None}, table))
        ranks = [method_rank[o] for o in ref.get("ours") or [] if o in method_rank]
        row.rank = 1000 + (min(ranks) if ranks else len(method_rank))
        pms = ref.get("pm") or {}
        for p in shown_metrics:
            if p in (ref.get("values") or {}):
                pm = pms.get(p)
                row.reported[maps[p]] = (float(ref["values"][p]) * scales[p], None if pm is None else float(pm) * scales[p])
        out.append(row)
    if skipped:
        wanted = sorted({(k, v) for ref in skipped for k, v in (ref.get("setting") or {}).items()},
                        key=lambda kv: (kv[0], order_value(kv[1])))
        notes.append(f"paper {name}: {len(skipped)} reference row(s) not shown, for settings the runs do not have "
                     f"({', '.join(f'{k}={v}' for k, v in wanted)})")
    return out


def paper_label(ref: dict[str, Any], table: dict[str, Any]) -> str:
    parts = [ref.get(k) for k in ("model", "dataset", "data") if ref.get(k)]
    return f"paper: {ref['method']}" + (f" ({', '.join(map(str, parts))})" if parts else "")


