"""A prior run's result as the next run's starting model (`model.from_run=PATH`): successive policy shifts
chain runs, each realigning the model the one before it produced.

A LoRA run saved an adapter on the model it started from; the adapter is merged into that model once and the
merged folder cached under paths.cache_dir, keyed by the adapter's bytes and the identity of its base, so a
re-run of the same chain reuses it and a different run never does. A run that trained the whole model is used
as it is. A run that failed or did not finish is refused, naming why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from trace_realign.core.rundir import FAILED_FILE, model_folder
from trace_realign.models.loading import load_for_eval, load_tokenizer
from trace_realign.models.prealign import model_identity

log = logging.getLogger(__name__)


class FromRunError(ValueError):
    """model.from_run names no finished run with a model."""


def finished_model(run: str | Path) -> Path:
    """The adapter/ or model/ folder a finished run saved; a clear error for anything else."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise FromRunError(f"model.from_run={run}: no such run folder")
    if (path / FAILED_FILE).is_file():
        first = (path / FAILED_FILE).read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        raise FromRunError(f"model.from_run={run}: that run failed ({first[0] if first else 'see FAILED'}); "
                           "it has no model to start from")
    if not (path / "metrics.json").is_file():
        raise FromRunError(f"model.from_run={run}: that run did not finish (no metrics.json); finish or re-run it "
                           "first (a run resumes from its own folder)")
    try:
        return model_folder(path)
    except ValueError as exc:
        raise FromRunError(f"model.from_run={run}: {exc}") from exc


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder)}\n".encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_from_run(run: str | Path, model_cfg: Mapping[str, Any], cache_dir: str | Path) -> str:
    """The folder of a prior run's model, ready to start from: its full weights, or its adapter merged into
    its base (built once, cached)."""
    folder = finished_model(run)
    adapter_cfg = folder / "adapter_config.json"
    if not adapter_cfg.is_file():
        return str(folder)
    base = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path") or ""
    key = hashlib.sha256(json.dumps({"adapter": _digest(folder), "base": model_identity(base),
                                     "dtype": model_cfg.get("dtype")}).encode()).hexdigest()[:16]
    target = Path(cache_dir).expanduser() / "from_run" / f"{Path(run).name}-{key}"
    if (target / "config.json").is_file():
        log.info("model.from_run: the merged model of %s, cached (%s)", run, target)
        return str(target)
    model = load_for_eval(str(folder), model_cfg)
    model = model.merge_and_unload()  # fold the adapter into its base's weights
    work = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    model.save_pretrained(work)
    load_tokenizer(str(folder), model_cfg).save_pretrained(work)
    (work / "from_run.json").write_text(json.dumps({"run": str(Path(run).resolve()), "adapter": str(folder),
                                                    "base": base}, indent=2))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(work, target)  # whole or not at all: a reader never sees a half-written model
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # another process wrote the same model first
    log.info("model.from_run: merged the adapter of %s into %s (%s)", run, base, target)
    return str(target)
