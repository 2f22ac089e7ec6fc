"""The "before" evaluation of a model this package built, kept on disk and reused.

Every run of a benchmark evaluates its starting model M_old before training: the same model, prompts,
judge and settings for every method of a seed, so the same numbers. The first run stores what the
evaluation gave (its metrics, its rows, the files its evaluators wrote under eval/before/); a later run
whose evaluation reads exactly the same inputs copies them instead of generating again.

The key is a hash of everything the evaluation reads: the model's identity (only a model this package
built, whose folder is named by the hash of what built it; any other model is evaluated every time),
how it is loaded and wrapped, the evaluators' settings, the judge's fingerprint, the policies, the held-out
items, the generation settings, the seed, the threads, the device and its chip, and the versions of the
libraries that compute it. An evaluation during which the judge failed a call is never stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from trace_realign.core.environment import arithmetic, versions
from trace_realign.models.prealign import model_identity

log = logging.getLogger(__name__)

# Bump when what an evaluation computes changes (an evaluator's rule, the judge's reading): older entries
# are then never read.
EVAL_CACHE_VERSION = 1
RESULT_FILE = "result.json"
# the run folder in stored files (lm-eval's task files and results name their own paths), put back as the
# folder of the run that reads them
RUN_DIR = "{TRACE_RUN_DIR}"
TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".log", ".txt")
SKIPPED = ("datasets_cache",)  # the datasets library's own cache of a task file: rebuilt when read
# marks a folder this package built (a prealign stage, a prior run's realigned model): its name hashes
# every input that built it
BUILT_MARKERS = ("stage_key.json", "from_run.json")
LIBRARIES = ("torch", "transformers", "peft", "lm_eval")
MODEL_KEYS = ("dtype", "attn_implementation", "disable_dropout", "revision", "trust_remote_code", "lora")
# what an evaluation gives: its metrics, its rows per held-out item, other evaluators' rows
Evaluation = tuple[dict[str, float], dict[int, dict[str, Any]], dict[str, list[dict[str, Any]]]]


def built_by_package(model_path: str) -> bool:
    p = Path(model_path)
    return p.is_dir() and any((p / m).is_file() for m in BUILT_MARKERS)


def _policy(p: Any) -> Any:
    return dataclasses.asdict(p) if dataclasses.is_dataclass(p) else repr(p)


def evaluation_key(cfg: DictConfig, model_path: str, evaluation: dict[str, Any], device: torch.device) -> str | None:
    """The before-evaluation's cache key, or None where it must not be cached (a model this package did
    not build, or a judge without a fingerprint)."""
    judge = evaluation["judge"]
    if not built_by_package(model_path) or not hasattr(judge, "fingerprint"):
        return None
    model = OmegaConf.to_container(cfg.model, resolve=True)
    ev = OmegaConf.to_container(cfg.eval, resolve=True)
    inputs = {
        "version": EVAL_CACHE_VERSION,
        "model": model_identity(model_path),
        "loading": {k: model.get(k) for k in MODEL_KEYS},
        "eval": {k: v for k, v in ev.items() if k != "preference"},  # the preference study is trace-eval's
        "limits": {k: cfg.data.get(k) for k in ("max_length", "max_prompt_length")},
        "judge": judge.fingerprint(),
        "new": _policy(evaluation["new"]),
        "old": _policy(evaluation["old"]),
        "policies": {k: _policy(v) for k, v in sorted(evaluation.get("policies", {}).items())},
        "items": evaluation["items"],
        "generation": dataclasses.asdict(evaluation["settings"]),
        "seed": cfg.seed,
        **arithmetic(device),  # threads, device, chip; the libraries are the evaluation's own (lm-eval too)
        "libraries": versions(LIBRARIES),
    }
    blob = json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_before(cfg: DictConfig, model_path: str, evaluation: dict[str, Any], device: torch.device, out: Path,
                    evaluate: Callable[[], Evaluation]) -> tuple[dict[str, float], dict[int, dict[str, Any]],
                                                                 dict[str, list[dict[str, Any]]], bool]:
    """The "before" evaluation (metrics, rows per item, other rows) and whether it was read from the cache:
    read where eval.cache_before allows it and an entry has this evaluation's key, else `evaluate()`d and
    stored unless a judge call failed meanwhile."""
    key = evaluation_key(cfg, model_path, evaluation, device) if cfg.eval.get("cache_before") else None
    stored = load(cfg.paths.cache_dir, key, out) if key else None
    if stored is not None:
        return (*stored, True)
    judge = evaluation["judge"]
    failed = getattr(judge, "failed_calls", 0)
    metrics, items, rows = evaluate()
    if key and getattr(judge, "failed_calls", 0) == failed:  # a failed judge call is never stored as a verdict
        store(cfg.paths.cache_dir, key, out, metrics, items, rows)
    return metrics, items, rows, False


def _entry(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "eval_before" / key


def load(cache_dir: str | Path, key: str, out: Path, when: str = "before") -> Evaluation | None:
    """A stored evaluation (metrics, rows per item, other rows), its files copied to out/eval/<when>/;
    None when there is none."""
    entry = _entry(cache_dir, key)
    if not (entry / RESULT_FILE).is_file():
        return None
    result = json.loads((entry / RESULT_FILE).read_text(encoding="utf-8"))
    _copy_files(entry / "files", out / "eval" / when, RUN_DIR, str(out))
    log.info("evaluation %s: cached (%s)", when, entry)
    items = {int(k): v for k, v in result["items"].items()}
    return result["metrics"], items, result["rows"]


def store(cache_dir: str | Path, key: str, out: Path, metrics: dict[str, float], items: dict[int, dict[str, Any]],
          rows: dict[str, list[dict[str, Any]]], when: str = "before") -> None:
    """Keep an evaluation under its key: written aside and renamed into place, so an interrupted write
    leaves no entry; a concurrent job's equal entry wins."""
    entry = _entry(cache_dir, key)
    if (entry / RESULT_FILE).is_file():
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        _copy_files(out / "eval" / when, work / "files", str(out), RUN_DIR)
        result = {"metrics": metrics, "items": {str(k): v for k, v in items.items()}, "rows": rows}
        (work / RESULT_FILE).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
        try:
            os.replace(work, entry)
        except OSError:  # another job stored the same evaluation first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_files(source: Path, target: Path, old: str, new: str) -> None:
    """An evaluation's files, their text naming `old` (a run folder) rewritten to name `new`."""
    if not source.is_dir():
        return
    for f in sorted(source.rglob("*")):
        rel = f.relative_to(source)
        if not f.is_file() or any(part in SKIPPED for part in rel.parts):
            continue
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix in TEXT_SUFFIXES:
            dest.write_text(f.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
        else:
            shutil.copyfile(f, dest)
