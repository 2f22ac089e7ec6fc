"""Resumable training: a checkpoint every few optimizer steps, and a re-run that continues from it.

A run writes `<run>/checkpoints/last.ckpt` every `checkpoint.every_n_steps` optimizer steps (rank 0 writes,
atomically, so a kill never leaves half a file). A re-run of the same configuration in the same folder
(rundir.claim refuses any other) continues from it when the last run did not finish (no metrics.json);
a finished run's re-run starts afresh, as before, and a finished run deletes its checkpoints (its adapter
or model is the result).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / LAST


def resume_point(out: Path, finished: bool) -> Path | None:
    """The checkpoint a re-run continues from: the last one of an unfinished run, else None. A finished
    run's leftover checkpoints are stale (the re-run replaces its results) and are deleted."""
    ckpt = checkpoint_path(out)
    if finished:
        discard(out)
        return None
    return ckpt if ckpt.is_file() else None


def discard(out: Path) -> None:
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


def checkpoint_every(cfg: Any) -> int:
    """checkpoint.every_n_steps as an int; 0 (or null, or no `checkpoint` node) turns checkpoints off."""
    n = (cfg.get("checkpoint") or {}).get("every_n_steps") or 0
    if int(n) < 0:
        raise ValueError(f"checkpoint.every_n_steps must be >= 0 (0 or null: no checkpoints), got {n}")
    return int(n)


class StepCheckpoint(L.Callback):
    """Saves the whole training state every `every_n_steps` optimizer steps to `path`.

    Unlike Lightning's ModelCheckpoint, it writes no checkpoint once training is over (max_steps reached,
    or a stop requested): resuming from one, Lightning skips the end-of-training hooks (the selection's
    restore of its best parameters), so a run killed after training resumes from the checkpoint before.
    It writes beside `path` and renames (one filesystem: a kill never leaves half a file there). Place
    it after the other callbacks: their on_train_batch_end of the step (the selection's check) belongs
    in the checkpoint.
    """

    def __init__(self, path: Path, every_n_steps: int):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint.every_n_steps must be >= 1 here, got {every_n_steps}")
        self.path, self.every = Path(path), every_n_steps
        self.last_saved = -1

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # A resumed run starts at a saved step: saving it again from within the next accumulation would
        # record a loop position between micro-batches.
        self.last_saved = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self.last_saved:
            return  # (under accumulation, the batches after a step see the same global_step)
        if trainer.should_stop or (trainer.max_steps > 0 and step >= trainer.max_steps):
            return
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # the whole state; every rank takes part, rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.last_saved = trainer.global_step
        log.debug("checkpoint at step %d: %s", trainer.global_step, self.path)


def rng_states() -> dict[str, Any]:
    """The global generators' states (dropout, if a config turns it on, draws from torch's), in types a
    weights_only load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
