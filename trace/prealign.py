"""Building M_old: the starting model, aligned to pi_old before any realignment.

The tiny default model is trained in stages (supervised fine-tuning, then DPO under pi_old) by the very
pipeline that realigns it: each stage is a run of `train.run` with its own term table (nll, then
relational on retained pairs) and full fine-tuning. The result is cached on disk, keyed by every setting
the stages read, so every run and sweep job reuses it; the stages run in a temporary directory that is
renamed into place only when the last one has finished, so an interrupted build leaves no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Bump when the data a stage sees changes meaning (e.g. the world's generator), to invalidate caches.
PREALIGN_VERSION = 1
# What every stage's data plan is, whatever the realignment run asks for (pipeline.DataPlan's defaults).
DATA_PLAN_DEFAULTS = {"splits": None, "train_split": "train", "eval_split": None, "size": None,
                      "label_noise": 0.0, "dpo_gold_punish": "keep"}
INFO_FILE = "prealign.json"


def stage_config(cfg: DictConfig, name: str, stage: DictConfig, model_path: str, out_dir: Path) -> DictConfig:
    """The full run config of one stage: the user's run with everything a stage fixes overridden."""
    if "stage" not in cfg.dataset:
        raise ValueError(f"model.prealign: dataset {cfg.dataset.get('_target_')} has no 'stage' to serve SFT/DPO data")
    s = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    s.model.name_or_path, s.model.build, s.model.prealign = model_path, None, None
    s.model.lora.enabled = False  # M_old is a full model: realignment then trains adapters on top of it
    s.model.gradient_checkpointing = False
    s.dataset.stage = name
    s.ablation = {"name": f"prealign_{name}", "triage": True, "impact": False, "kl": False,
                  "terms": OmegaConf.to_container(stage.terms)}
    s.loss = {"type": "sigmoid", "beta": float(stage.get("beta", 0.1))}
    s.objective = {"alpha_kl": 0.0, "reduction": "mean", "stop_grad_norm": 0.0}
    s.optimizer.lr = float(stage.lr)
    s.scheduler = None
    s.data.batch_size = {"invert": 1, "punish": 1, "retain": int(stage.batch_size)}
    s.trainer.max_steps = int(stage.steps)
    s.trainer.accumulate_grad_batches = 1
    s.trainer.devices, s.trainer.strategy = 1, "auto"
    for key, value in DATA_PLAN_DEFAULTS.items():
        s.data[key] = value  # a stage trains on all its data: realignment's splits, sizes and noise are not its
    s.eval.enabled = False
    s.select = {"enabled": False}  # M_old follows pi_old: nothing may select it by pi_new
    s.pop("judge", None)
    if "noise" in s.oracle:
        s.oracle.noise = 0.0  # stage data come labelled; the oracle's noise is realignment's business
    s.logger = {}
    s.seed = int(stage.get("seed", 0))
    s.paths.output_dir = str(out_dir)
    return s


def _key(stage_cfgs: list[DictConfig]) -> str:
    """Everything the stages read, less where they write and the machine-only trainer settings."""
    parts = []
    for s in stage_cfgs:
        c = OmegaConf.to_container(s, resolve=True)
        for k in ("paths", "hydra", "logger", "eval", "select", "oracle", "judge", "tags", "task_name", "optimized_metric"):
            c.pop(k, None)
        for k in DATA_PLAN_DEFAULTS:  # fixed for every stage (stage_config)
            c["data"].pop(k, None)
        c["model"]["name_or_path"] = Path(c["model"]["name_or_path"]).name  # the base dir name is its hash
        c["trainer"] = {k: c["trainer"][k] for k in ("max_steps", "gradient_clip_val", "precision")}
        parts.append(c)
    blob = json.dumps({"version": PREALIGN_VERSION, "stages": parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prealigned_model(
    cfg: DictConfig, base_path: str, run_stage: Callable[[DictConfig], dict[str, Any]]
) -> tuple[str, dict[str, float]]:
    """The cached M_old directory for this config, built with `run_stage` (train.run) when missing."""
    stages = cfg.model.prealign.stages
    cache = Path(cfg.paths.cache_dir)
    names = list(stages.keys())
    placeholder = [stage_config(cfg, n, stages[n], base_path, cache) for n in names]
    target = cache / f"m-old-{_key(placeholder)}"
    if (target / "config.json").is_file():
        info = json.loads((target / INFO_FILE).read_text()) if (target / INFO_FILE).is_file() else {}
        return str(target), {**{k: float(v) for k, v in info.items() if k.startswith("prealign/")}, "prealign/cached": 1.0}
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    metrics: dict[str, float] = {"prealign/cached": 0.0}
    start = time.time()
    try:
        model_path = base_path
        for name in names:
            log.info("building M_old: stage %s", name)
            out = work / name
            m = run_stage(stage_config(cfg, name, stages[name], model_path, out))
            metrics.update({f"prealign/{name}/{k.split('/')[-1]}": float(v) for k, v in m.items()
                            if k in ("train/first_loss", "train/loss", "train/seconds")})
            model_path = str(out / "model")
        metrics["prealign/seconds"] = time.time() - start
        (Path(model_path) / INFO_FILE).write_text(json.dumps(metrics, indent=2))
        try:
            os.replace(model_path, target)
        except OSError:  # another job finished the same build first: its copy is equivalent
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("M_old ready at %s (%.0f s)", target, metrics["prealign/seconds"])
    return str(target), metrics
