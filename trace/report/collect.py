"""Collecting runs: run folders (a sweep's jobs, single runs, or folders holding either) read into Jobs,
and what names a job (its method, seed and settings)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from trace_realign.core.rundir import FAILED_FILE, RUN_FILE
from trace_realign.method.ablation import ablated_name

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
FORMATS = ("md", "csv", "tex")




class TablesError(ValueError):
    """Bad input: a path without runs, an unknown metric or method, inconsistent runs."""



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


def read_yaml(path: Path) -> Any:
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
        config = flatten(read_yaml(path / "config.yaml") or {})
    overrides = None
    if (path / ".hydra" / "overrides.yaml").is_file():
        listed = read_yaml(path / ".hydra" / "overrides.yaml") or []
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
            loaded = read_yaml(path / name)
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
            loaded = read_yaml(path / name)
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


def value_of(job: Job, key: str, source: str = "overrides") -> Any:
    """A setting's value for a job: its override when it has one, else the resolved config's."""
    if key == "method":
        return method_of(job)
    if source == "overrides" and job.overrides is not None and key in job.overrides:
        return job.overrides[key]
    return job.config.get(key)


