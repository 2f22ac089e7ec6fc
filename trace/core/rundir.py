"""A run directory belongs to one configuration.

Scripts and re-run sweeps pin `hydra.run.dir`; a second run into the same folder must not train or
evaluate on what the first one left there. The first run records its resolved configuration in run.json;
a later run into the folder goes ahead only with the same configuration (a re-run, which replaces the
outputs) and otherwise stops, naming the settings that differ. Each run also records there what it
computed under (libraries, threads, device, the source's commit: core/environment.py), a re-run its own.
A run that fails writes FAILED with the reason, and never leaves a metrics.json behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trace_realign.core.environment import describe

RUN_FILE = "run.json"
FAILED_FILE = "FAILED"
# Settings that change where or how visibly a run works, never what it computes. model.tuned is the model's
# table of every method's tuned recipe: a run reads its own row through the settings it resolves to
# (optimizer.lr, loss.beta, ... are compared), so another method's row is never a difference.
VOLATILE = ("paths.", "trainer.enable_progress_bar", "oracle.progress", "judge.progress", "logger.", "tags",
            "quiet", "task_name", "report.", "checkpoint.", "model.tuned.", "eval.cache_before")
# What a finished or half-finished run leaves behind.
OUTPUTS = ("metrics.json", "generations.jsonl", "data", "adapter", "model", "config.yaml", "checkpoints")


class RunDirError(RuntimeError):
    """The run directory holds another configuration's run."""


def volatile(key: str) -> bool:
    """Whether a dotted key is one of the VOLATILE settings ("logger." also names `logger` itself, the empty
    node that logger=none leaves)."""
    return any(key == v.rstrip(".") or key.startswith(v) for v in VOLATILE)


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved configuration as {dotted.key: value}, without the volatile settings."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            key = prefix[:-1]
            if not volatile(key):
                out[key] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ between two flat configurations; volatile ones never do (a run recorded
    before a setting was known to be volatile still carries it)."""
    keys = sorted(k for k in set(stored) | set(now) if not volatile(k))
    return [f"{k}: {stored.get(k, '<unset>')!r} there, {now.get(k, '<unset>')!r} now" for k in keys
            if stored.get(k, "<unset>") != now.get(k, "<unset>")]


def claim(out: Path, cfg: DictConfig) -> None:
    """Make `out` this configuration's run directory, or stop if it belongs to another one."""
    out.mkdir(parents=True, exist_ok=True)
    now = json.loads(json.dumps(flat_config(cfg), default=str))
    record = out / RUN_FILE
    if record.is_file():
        # (a record written before `logger` itself counted as volatile may still hold it)
        stored = {k: v for k, v in json.loads(record.read_text()).get("config", {}).items() if not volatile(k)}
        diff = differences(stored, now)
        if diff:
            shown = "\n  ".join(diff[:12]) + (f"\n  ... and {len(diff) - 12} more" if len(diff) > 12 else "")
            raise RunDirError(f"{out} holds a run of another configuration ({len(diff)} settings differ):\n  {shown}\n"
                              "Give this run its own folder (hydra.run.dir=...) or delete that one.")
    else:
        left = [name for name in OUTPUTS if (out / name).exists()]
        if left:
            raise RunDirError(f"{out} holds outputs ({', '.join(left)}) of a run with no record of its configuration "
                              f"({RUN_FILE}); give this run its own folder (hydra.run.dir=...) or delete that one")
        record.write_text(json.dumps({"config": now}, indent=1, sort_keys=True) + "\n")
    # A re-run replaces the results: a failure now must not leave the last run's numbers looking current.
    for name in ("metrics.json", FAILED_FILE):
        (out / name).unlink(missing_ok=True)
    save_hydra_record(out, cfg)


def record_environment(out: Path, device: torch.device) -> None:
    """Write the environment this run computes under into run.json ("environment"; a re-run replaces it:
    the outputs it describes are the re-run's)."""
    record = out / RUN_FILE
    data = json.loads(record.read_text()) if record.is_file() else {}
    data["environment"] = describe(device)
    record.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def save_hydra_record(out: Path, cfg: DictConfig) -> None:
    """Hydra's own record of the job (.hydra/: config, hydra settings, overrides), written only once the
    folder is ours (hydra.output_subdir is null, so Hydra itself never writes into a folder we refuse)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg
    record = out / ".hydra"
    record.mkdir(exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(hydra_cfg, record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.hydra.overrides.task, record / "overrides.yaml")


def record_failure(out: Path, exc: BaseException) -> None:
    """Write why the run failed into its folder (and no metrics)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        (out / FAILED_FILE).write_text(f"{type(exc).__name__}: {exc}\n\n{text}")
    except OSError:
        pass  # the original error matters more than this note


def model_folder(run: Path) -> Path:
    """The model a finished run saved: adapter/ (LoRA) or model/ (full weights). A failed or unfinished run
    has none, and says which."""
    if (run / FAILED_FILE).is_file():
        raise ValueError(f"{run}: that run failed ({run / FAILED_FILE}); it has no model")
    for sub in ("adapter", "model"):
        if (run / sub / "config.json").is_file() or (run / sub / "adapter_config.json").is_file():
            return run / sub
    raise ValueError(f"{run}: the run folder holds neither adapter/ nor model/ (unfinished?)")


class RunFailed(RuntimeError):
    """A `trace-realign` run launched by a script failed: no verdict on its settings."""


def launch(run_dir: Path, job: Sequence[str], threads: int | None = None) -> dict[str, Any]:
    """Run `trace-realign` into `run_dir` with the overrides `job`, in a subprocess of this Python, and return
    its metrics.json with the run's wall time (wall_seconds, also written back). `threads` pins torch's CPU
    threads (runs launched side by side take one core each). A failed run raises RunFailed with the command
    and the end of its stderr, and is never read as a result."""
    exe = Path(sys.executable).parent / "trace-realign"
    cmd = [str(exe), f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *job,
           *([f"threads={threads}"] if threads is not None else [])]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    if res.returncode != 0:
        raise RunFailed(f"{' '.join(cmd)} failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_seconds"] = time.time() - start
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def launch_all(runs: Sequence[tuple[Path, Sequence[str]]], jobs: int = 1) -> list[dict[str, Any]]:
    """`launch` each (run_dir, job), `jobs` at a time; with more than one at a time each run takes one CPU
    thread (threads=1), so that side-by-side runs do not contend for cores. Results in the order given."""
    if jobs <= 1:
        return [launch(d, j) for d, j in runs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda r: launch(r[0], r[1], threads=1), runs))
