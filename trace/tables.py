"""`trace-tables`: run folders (a sweep's jobs, single runs, or folders holding either) to the paper's tables.

    trace-tables multirun/table4_ablation/2026-01-01_12-00-00-000000
    trace-tables multirun/table3_data_size/... --plots --paper table3 --out tables/table3

Jobs are grouped by their overrides less the seed (.hydra/overrides.yaml; without it by the settings of
run.json that differ between the runs). A row is a method (run.json's method.name; an ablated one is
named for its ablation) in one setting of the other varying keys; a column is a metric. Each cell
aggregates the seeds: mean ± standard deviation and n, with the 95 % t-interval in table.csv. A `before`
row is the starting model M_old (eval/before/*).
Each row is compared with the baseline method paired by seed. Failed and unfinished jobs are listed and
never averaged; the paper's own numbers appear as marked reference rows, never mixed with runs.

Reading folders (load_jobs), writing files, plots and wandb aside, every step takes and returns plain data,
so it is testable without files.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from trace_realign.ablation import ablated_name
from trace_realign.rundir import FAILED_FILE, RUN_FILE, volatile

DEFAULT_METRICS = (
    "eval/after/tpa/shifted",
    "eval/after/tpa/unchanged",
    "eval/after/utility",
    "eval/after/tpa",
    "time/total_seconds",
)
# The config group naming the method; `ablation` is its former name, still read from older runs.
METHOD_KEYS = ("method", "ablation")
BASELINES = ("trace", "full")  # TRACE as published: `trace`, named `full` before the group was renamed
BEFORE = "before"
PAPER_FILE = Path(__file__).with_name("paper_results.yaml")
FORMATS = ("md", "csv", "tex")


class TablesError(ValueError):
    """Bad input: a path without runs, an unknown metric or method, inconsistent runs."""


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
    seeds = tuple(sorted((s for s in row if s in baseline), key=_order_value))
    diff = summarize([row[s] - baseline[s] for s in seeds])
    significant = diff.n >= 2 and not math.isnan(diff.ci95) and (diff.low > 0 or diff.high < 0)
    return Paired(diff, seeds, significant)


# -------------------------------------------------------------------------------------------- run folders


@dataclass
class Job:
    """One run folder as plain data. `overrides` is None without .hydra/overrides.yaml; `metrics` is None
    unless the run finished; `failed` is the first line of FAILED."""

    path: str
    config: dict[str, Any]
    overrides: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    failed: str | None = None
    task_name: str | None = None
    order: int = 0  # position among the folders read (job numbers in order)
    report: dict[str, Any] | None = None  # the run's `report` block: its paper table, rows and columns

    @property
    def status(self) -> str:
        if self.failed is not None:
            return "failed"  # FAILED wins: a run that failed leaves no numbers to trust
        return "finished" if self.metrics is not None else "unfinished"


def parse_overrides(lines: Iterable[str]) -> dict[str, Any]:
    """Hydra's override strings ('key=value', '+key=value', '~key') as {key: value}, values read as YAML
    scalars (seed=1 -> 1, data.label_noise=0.1 -> 0.1); a deletion's value is '<deleted>'."""
    out: dict[str, Any] = {}
    for line in lines:
        text = str(line).strip()
        if text.startswith("~"):
            out[text[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, sep, value = text.lstrip("+").partition("=")
        if not sep:
            raise TablesError(f"override {text!r} has no '='")
        try:
            out[key] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def natural_key(path: Path) -> list[Any]:
    """Folders in human order: job 10 after job 9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (RUN_FILE, "metrics.json", FAILED_FILE))


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Every run folder at or under each path (a folder with run.json, metrics.json or FAILED), once each."""
    found: dict[Path, None] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise TablesError(f"{given}: no such folder")
        if not root.is_dir():
            raise TablesError(f"{given}: not a folder (give a run folder, a sweep folder or a folder holding them)")
        runs = [root] if is_run_dir(root) else []
        if not runs:
            for here, dirs, _ in os.walk(root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if is_run_dir(Path(here)):
                    runs.append(Path(here))
                    dirs[:] = []  # a run folder's own subfolders (data/, csv/, adapter/) hold no runs
        if not runs:
            raise TablesError(f"{given}: holds no run folders (none with {RUN_FILE}, metrics.json or {FAILED_FILE})")
        for run in sorted(runs, key=natural_key):
            found.setdefault(run.resolve(), None)
    return list(found)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; anything else is an error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TablesError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TablesError(f"{path}: cannot be read as YAML ({exc})") from exc


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted.key: value} (run.json's form)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def load_job(path: Path, order: int = 0) -> Job:
    """Read one run folder: run.json (else config.yaml), .hydra/overrides.yaml, metrics.json, FAILED."""
    config: dict[str, Any] = {}
    if (path / RUN_FILE).is_file():
        config = dict(_read_json(path / RUN_FILE).get("config", {}))
    elif (path / "config.yaml").is_file():
        config = flatten(_read_yaml(path / "config.yaml") or {})
    overrides = None
    if (path / ".hydra" / "overrides.yaml").is_file():
        listed = _read_yaml(path / ".hydra" / "overrides.yaml") or []
        if not isinstance(listed, list):
            raise TablesError(f"{path / '.hydra' / 'overrides.yaml'}: not a list of overrides")
        overrides = parse_overrides(listed)
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    failed = None
    if (path / FAILED_FILE).is_file():
        lines = (path / FAILED_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
        failed = next((line.strip() for line in lines if line.strip()), "(FAILED is empty)")
    return Job(str(path), config, overrides, metrics, failed, read_task_name(path, config, overrides), order,
               read_report(path))


def read_report(path: Path) -> dict[str, Any] | None:
    """The `report` block of the run's config (experiment files set it; run.json leaves it out as volatile)."""
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (path / name).is_file():
            loaded = _read_yaml(path / name)
            if isinstance(loaded, dict) and isinstance(loaded.get("report"), dict):
                return loaded["report"]
    return None


def read_task_name(path: Path, config: dict[str, Any], overrides: dict[str, Any] | None) -> str | None:
    """The run's task_name (run.json leaves it out as volatile): config.yaml, .hydra/config.yaml, or the
    experiment it was launched with."""
    if config.get("task_name"):
        return str(config["task_name"])
    for name in ("config.yaml", ".hydra/config.yaml"):
        if (path / name).is_file():
            loaded = _read_yaml(path / name)
            if isinstance(loaded, dict) and loaded.get("task_name"):
                return str(loaded["task_name"])
    if overrides and overrides.get("experiment"):
        return str(overrides["experiment"])
    return None


def load_jobs(paths: Sequence[str | Path]) -> list[Job]:
    jobs = [load_job(p, i) for i, p in enumerate(find_run_dirs(paths))]
    return [part for job in jobs for part in (evaluation_rows(job) if is_evaluation(job) else [job])]


def is_evaluation(job: Job) -> bool:
    """A trace-eval folder: its config has the app's `models_from` key."""
    return "models_from" in job.config


def evaluation_rows(job: Job) -> list[Job]:
    """A trace-eval folder as one job per model it evaluated, so its models become rows like methods:
    eval/<label>/<key> reads as eval/after/<key>, preference/<label>_vs_<other>/<stat> as
    preference/<stat>_vs_<other>, preference/<label>/<stat> as preference/<stat>, and what belongs to
    no model (preference/alpha over all labels, say) as preference/<stat>_all in every row."""
    overrides = {k: v for k, v in (job.overrides or {}).items() if not k.startswith(("models", "models_from"))}
    metrics = job.metrics or {}
    labels = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.count("/") >= 2
                     and k.split("/")[1] not in ("before", "after", "preference")}, key=str)
    if job.status != "finished" or not labels:
        labels = [str(k.split(".", 1)[1]) for k in job.config if k.startswith("models.")] or ["evaluation"]
    out = []
    for label in labels:
        own = {f"eval/after/{k[len(f'eval/{label}/'):]}": v for k, v in metrics.items() if k.startswith(f"eval/{label}/")}
        for k, v in metrics.items():
            if not k.startswith("preference/"):
                continue
            parts = k.split("/")
            if len(parts) == 3 and parts[1].startswith(f"{label}_vs_"):
                own[f"preference/{parts[2]}_vs_{parts[1][len(label) + 4:]}"] = v
            elif len(parts) == 3 and parts[1] == label:
                own[f"preference/{parts[2]}"] = v
            elif len(parts) == 2:
                own[f"{k}_all"] = v
        out.append(Job(f"{job.path}#{label}", job.config, {**overrides, "method": label},
                       own if job.metrics is not None else None, job.failed, job.task_name, job.order, job.report))
    return out


# --------------------------------------------------------------------------------------------- grouping


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _order_value(value: Any) -> tuple:
    """Sort key mixing None, numbers and strings: None first, numbers by value, then text."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def method_of(job: Job) -> str:
    """The method: run.json's method.name (an ablated method is named for its ablation: no_kl,
    trace_nll_no_kl), else an older run's ablation.name, else the `method=` and `ablation=` overrides."""
    name = job.config["method.name"] if "method.name" in job.config else job.config.get("ablation.name")
    if name not in (None, ""):
        return str(name)
    overrides = job.overrides or {}
    method, ablation = overrides.get("method"), overrides.get("ablation")
    if ablation not in (None, "", "none", "full"):  # full: TRACE, as the ablation group once named it
        return ablated_name(str(method or "trace"), str(ablation))
    return str(method) if method not in (None, "") else "run"


def seed_of(job: Job) -> Any:
    if job.overrides and "seed" in job.overrides:
        return job.overrides["seed"]
    return job.config.get("seed")


def _ignored(key: str) -> bool:
    """Keys that never make a setting: the seed, the method itself, Hydra's own and volatile settings."""
    return key == "seed" or key in METHOD_KEYS or key.startswith("hydra") or volatile(key)


def _values(jobs: Sequence[Job], key: str, source: str) -> list[Any]:
    return [_hashable(value_of(j, key, source)) for j in jobs]


def value_of(job: Job, key: str, source: str = "overrides") -> Any:
    """A setting's value for a job: its override when it has one, else the resolved config's."""
    if key == "method":
        return method_of(job)
    if source == "overrides" and job.overrides is not None and key in job.overrides:
        return job.overrides[key]
    return job.config.get(key)


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


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def available_metrics(jobs: Sequence[Job]) -> list[str]:
    """The numeric metric keys any finished run has."""
    keys = {k for j in jobs if j.status == "finished" for k, v in (j.metrics or {}).items() if _numeric(v) is not None}
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
            raise TablesError(f"two finished runs of {method} {_setting_text(settings)}with seed {seed_of(j)}: "
                              f"{other.path} and {j.path}; pass only one of them")
    row.kept_m_old = sum(j.metrics.get("select/best_step") == 0 for j in by_seed.values())  # type: ignore[union-attr]
    for m in metrics:
        values = {s: _numeric(j.metrics.get(m)) for s, j in by_seed.items()}  # type: ignore[union-attr]
        lacking = [by_seed[s].path for s, v in values.items() if v is None]
        if lacking and len(lacking) < len(values):
            notes.append(f"{method} {_setting_text(settings)}: {m} missing in {len(lacking)} finished run(s): "
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
            v = _numeric((j.metrics or {}).get(key)) if j.status == "finished" else None
            if v is not None:
                seen.setdefault(_seed_id(j), []).append(v)
        for seed, vs in seen.items():
            if max(vs) - min(vs) > 1e-9:
                notes.append(f"before {_setting_text(settings)}: {key} differs between the runs of seed {seed} "
                             f"({', '.join(f'{v:g}' for v in vs)}); their mean is shown")
        row.per_seed[m] = {s: math.fsum(vs) / len(vs) for s, vs in seen.items()}
        row.cells[m] = summarize(list(row.per_seed[m].values()))
        found = found or bool(seen)
    return row if found else None


def _setting_text(settings: dict[str, Any]) -> str:
    shown = {k: v for k, v in settings.items() if k != "method"}
    return "(" + ", ".join(f"{k}={_show_value(v)}" for k, v in shown.items()) + ") " if shown else ""


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
            notes.append(f"{r.label} {_setting_text(r.settings)}: no {baseline} runs in this setting to pair with")
            continue
        result = {}
        for m in metrics:
            if r.cells.get(m) is None:
                continue
            result[m] = paired(r.per_seed.get(m, {}), base.per_seed.get(m, {}))
            alone = sorted((set(r.per_seed.get(m, {})) ^ set(base.per_seed.get(m, {}))), key=_order_value)
            if alone:
                notes.append(f"{r.label} vs {baseline} {_setting_text(r.settings)}on {m}: seed(s) "
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
            parts.append(_order_value(_hashable(row.settings.get(k))))
    return tuple(parts)


# ---------------------------------------------------------------------------------------- paper numbers


def load_paper(path: Path = PAPER_FILE) -> dict[str, Any]:
    data = _read_yaml(path)
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
    na, nb = _numeric(a), _numeric(b)
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
                        key=lambda kv: (kv[0], _order_value(kv[1])))
        notes.append(f"paper {name}: {len(skipped)} reference row(s) not shown, for settings the runs do not have "
                     f"({', '.join(f'{k}={v}' for k, v in wanted)})")
    return out


def paper_label(ref: dict[str, Any], table: dict[str, Any]) -> str:
    parts = [ref.get(k) for k in ("model", "dataset", "data") if ref.get(k)]
    return f"paper: {ref['method']}" + (f" ({', '.join(map(str, parts))})" if parts else "")


# ------------------------------------------------------------------------------------------ formatting


def _num(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.1f}" if abs(x) >= 10 or x == 0 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _show_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, tuple):
        return "[" + ", ".join(_show_value(x) for x in v) + "]"
    return str(v)


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
    return [row.label if k == "method" else _show_value(row.settings.get(k)) if k in row.settings else ""
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
            "" if p not in vals else _show_value(vals[p]) + (f" ± {pms[p]}" if p in pms else "")
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
            seeds = " ".join(str(k) for k in sorted(r.per_seed.get(m, {}), key=_order_value))
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
        x = _numeric(r.settings.get(x_key))
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
            label = r.label + (" " + _setting_text(others).strip() if others else "")
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
    from trace_realign import plots

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
        title = f"{method_of(j)} {_setting_text(settings)}seed {seed_of(j)}"
        stem = _slug(f"curves_{method_of(j)}_{_setting_text(settings)}seed{seed_of(j)}")
        stem = stem if stem not in used else _slug(f"{stem}_{Path(j.path).name}_{j.order}")
        used.add(stem)
        written.append(plots.plot_curves(panels, title, out / f"{stem}.png"))
    return written, notes


# ------------------------------------------------------------------------------------------------- wandb


def wandb_table_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The main table in long form for a wandb.Table."""
    columns = ["row", "kind", *report.keys, "metric", "mean", "std", "n", "ci95", "min", "max", "cell"]
    data = []
    for r in report.rows:
        for m in report.metrics:
            s = r.cells.get(m)
            if r.kind == "paper" and m in r.reported:
                data.append([r.label, r.kind, *label_cells(r, report.keys), m, r.reported[m][0], None, None, None,
                             None, None, cell_text(r, m)])
            elif s is not None:
                clean = [None if isinstance(x, float) and math.isnan(x) else x for x in (s.mean, s.std)]
                rest = [None if isinstance(x, float) and math.isnan(x) else x for x in (s.ci95, s.min, s.max)]
                data.append([r.label, r.kind, *label_cells(r, report.keys), m, *clean, s.n, *rest, cell_text(r, m)])
    return columns, data


def log_to_wandb(report: Report, images: Sequence[Path], group: str, out: Path) -> str:
    """One summary run (job_type `tables`): the table, the paired table and the plots. Offline unless
    credentials are present (or WANDB_MODE says otherwise); only the table's own options go into its
    config, never the environment. Returns the run's folder."""
    try:
        import wandb
    except ImportError as exc:
        raise TablesError("--wandb needs wandb: pip install wandb") from exc
    from trace_realign.loggers import wandb_credentials_present

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if wandb.run is not None:
        wandb.finish()  # a run left open in this process would otherwise receive the table
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT") or "trace-realign", group=group, job_type="tables",
        # the folder given explicitly: wandb reads WANDB_DIR only when it first sets up in a process
        mode=mode, dir=os.environ.get("WANDB_DIR") or str(out),
        config={"metrics": report.metrics, "baseline": report.baseline, "rows": report.keys,
                "paper_tables": list(report.paper_tables)},
    )
    try:
        columns, data = wandb_table_rows(report)
        payload: dict[str, Any] = {"tables/results": wandb.Table(columns=columns, data=data)}
        if report.paired:
            pc = ["row", *report.keys, "metric", "n_pairs", "mean_diff", "low", "high", "significant"]
            pd = [[r.label, *label_cells(r, report.keys), m, p.diff.n,
                   *(None if math.isnan(x) else x for x in (p.diff.mean, p.diff.low, p.diff.high)), p.significant]
                  for r, res in report.paired for m, p in res.items()]
            payload["tables/paired"] = wandb.Table(columns=pc, data=pd)
        for path in images:
            payload[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()


# -------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trace-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders, or folders holding them")
    p.add_argument("--metrics", nargs="+", metavar="KEY",
                   help=f"metrics.json keys (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--rows", metavar="KEY",
                   help="the row-label column: method (default) or a varying setting, e.g. data.size")
    p.add_argument("--baseline", metavar="NAME",
                   help="the method the paired table compares with (default: trace, else full)")
    p.add_argument("--out", metavar="DIR", type=Path, help="where the files go (default: the first PATH)")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="files to write (default: all)")
    p.add_argument("--paper", nargs="+", metavar="TABLE",
                   help="show the paper's reference rows of these tables (e.g. table4); `none`: not even those the "
                        "runs' task name names")
    p.add_argument("--plots", action="store_true",
                   help="PNG plots: metric vs data.size / data.label_noise, training curves")
    p.add_argument("--wandb", action="store_true",
                   help="log the table and plots to one wandb run (offline without credentials)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        jobs = load_jobs(args.paths)
        if not any(j.status == "finished" for j in jobs):
            print(jobs_markdown([j for j in jobs if j.status == "failed"],
                                [j for j in jobs if j.status == "unfinished"]), file=sys.stderr)
            raise TablesError(f"no finished run under {', '.join(map(str, args.paths))} (the jobs above)")
        report = build_report(jobs, args.metrics, args.rows, args.baseline, args.paper)
        out = args.out or Path(args.paths[0])
        print(render_markdown(report), end="")
        written = write_outputs(report, out, args.format)
        images: list[Path] = []
        if args.plots:
            images, notes = make_plots(report, jobs, out)
            for n in notes:
                print(f"note: {n}")
        if args.wandb:
            # the training jobs log into the wandb group of their task (conf/logger/wandb.yaml): join it
            task = next((j.task_name for j in jobs if j.task_name), None)
            where = log_to_wandb(report, images, task or Path(args.paths[0]).resolve().name, out)
            print(f"wandb: logged to {where}")
        for path in [*written, *images]:
            print(f"wrote {path}")
    except (TablesError, ImportError) as exc:  # ImportError: matplotlib or wandb missing, said plainly
        print(f"trace-tables: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
