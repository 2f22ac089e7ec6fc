"""Building M_old: the starting model, aligned to pi_old before any realignment.

The tiny default model is trained in stages (pretraining, supervised fine-tuning, then DPO under pi_old)
by the very pipeline that realigns it: each stage is a run of `train.run` with a method of conf/method/
(sft, then dpo) and full fine-tuning. A stage's data come from the run's data source:
a source that knows how to serve them (the embedded world: `stage_pairs`) serves its own, any other
source gets the generic stages built from its pairs as annotated (`StageData`).

The same pipeline re-run with pi_new's labels in place of pi_old's is the full re-training upper bound
(DPO-Gold): `labels="new"`.

The result is cached on disk, keyed by what the stages read: the content of each stage's data, each
stage's hyperparameters and the base model, and by what computes them (core/environment.py: the
libraries' versions, torch's threads, the device; a model trained under other arithmetic has other last
bits, and its realignments read other numbers than a fresh build would give). Nothing else (realignment's settings, where runs write)
enters the key, so no realignment setting rebuilds M_old and no stage setting is ignored. The stages run
in a temporary directory that is renamed into place only when the last one has finished, so an
interrupted build leaves no cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from trace_realign.core.environment import arithmetic, device_for
from trace_realign.core.records import RETAIN, PreferencePair
from trace_realign.data.stages import pairs_digest

log = logging.getLogger(__name__)

# Bump when what a stage does with the same data and settings changes meaning, to invalidate caches.
PREALIGN_VERSION = 4  # 4: logits of the scored columns only, fused forwards on a CPU (other last bits)
# What every stage's data plan is, whatever the realignment run asks for (pipeline.DataPlan's defaults).
DATA_PLAN_DEFAULTS = {"splits": None, "train_split": "train", "eval_split": None, "size": None,
                      "label_noise": 0.0, "noise_style": "category", "dpo_gold_punish": "keep"}
INFO_FILE = "prealign.json"
# what each build is called in the log, by its metrics prefix
BUILDS = {"prealign": "M_old", "retrain": "the re-trained upper bound", "finetune": "M_old fine-tuned with pi_new's labels"}
GENERIC_STAGES = ("pretrain", "sft", "dpo")


class StageData:
    """The data one stage trains on, from any data source, every pair labelled retain and trusted.

    A source with `stage_pairs(stage, labels, gold_punish)` serves its own (the embedded world). For any
    other source the stages are built from its pairs as annotated: pretrain on every response (chosen and
    rejected: all the data can say), sft on the chosen responses, dpo on the pairs. Only a source that
    knows pi_new's labels can serve labels="new".
    """

    triaged = True

    def __init__(self, source: Any, stage: str, labels: str = "old", gold_punish: str = "correction"):
        self.source, self.stage, self.labels, self.gold_punish = source, stage, labels, gold_punish
        self.old, self.new = source.old, source.new
        self._pairs: list[PreferencePair] | None = None
        if not hasattr(source, "stage_pairs"):
            if stage not in GENERIC_STAGES:
                raise ValueError(f"model.prealign.stages: unknown stage {stage!r}; expected one of {GENERIC_STAGES}")
            if labels != "old":
                raise ValueError(
                    f"building a model under pi_new's labels (full re-training) needs a dataset that knows them; "
                    f"{type(source).__name__} serves its pairs as annotated only. Use the embedded world "
                    "(dataset=embedded), or DPO on the relabelled pairs fine-tuned from M_old (method=dpo_gold)")

    def train_pairs(self) -> list[PreferencePair]:
        if self._pairs is None:
            if hasattr(self.source, "stage_pairs"):
                pairs = self.source.stage_pairs(self.stage, self.labels, self.gold_punish)
            else:
                pairs = generic_stage_pairs(self.source.train_pairs(), self.stage)
            self._pairs = [replace(p, category=RETAIN) for p in pairs]
        return self._pairs

    def eval_prompts(self) -> list[dict[str, Any]]:
        return []

    def corpus(self) -> list[str]:
        return self.source.corpus()


def generic_stage_pairs(pairs: list[PreferencePair], stage: str) -> list[PreferencePair]:
    """Stages for a source that serves only its annotated pairs (see StageData)."""
    if stage == "pretrain":
        # each response once as the nll target ("chosen"); the rejected slot is unused by nll
        return [PreferencePair(p.prompt, y, p.rejected) for p in pairs for y in dict.fromkeys((p.chosen, p.rejected))]
    return [PreferencePair(p.prompt, p.chosen, p.rejected) for p in pairs]


def stage_config(cfg: DictConfig, name: str, stage: DictConfig, model_path: str, out_dir: Path) -> DictConfig:
    """The full run config of one stage: the user's run with everything a stage fixes overridden."""
    s = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    s.model.name_or_path, s.model.build, s.model.prealign = model_path, None, None
    s.model.from_run = None  # a stage starts from model_path, never from the run a later shift chains to
    s.model.lora.enabled = False  # M_old is a full model: realignment then trains adapters on top of it
    s.model.gradient_checkpointing = False
    s.method = method_config(str(stage.method))
    s.pop("ablation", None)  # the run's ablation changes the realigning method, never M_old's stages
    s.loss = {"type": "sigmoid", "beta": float(stage.get("beta", 0.1))}
    s.objective = {"alpha_kl": 0.0, "reduction": "mean", "stop_grad_norm": 0.0}
    s.optimizer.lr = float(stage.lr)
    # A learning rate that decays to 0 over the stage: the same steps end at a much lower loss.
    s.scheduler = None if stage.get("schedule", "linear") == "constant" else {
        "_target_": "torch.optim.lr_scheduler.LinearLR", "_partial_": True,
        "start_factor": 1.0, "end_factor": 0.0, "total_iters": int(stage.steps)}
    s.data.batch_size = {"invert": 1, "punish": 1, "retain": int(stage.batch_size)}
    s.trainer.max_steps = int(stage.steps)
    s.trainer.accumulate_grad_batches = 1
    s.trainer.devices, s.trainer.strategy = 1, "auto"
    s.trainer.enable_progress_bar = False
    for key, value in DATA_PLAN_DEFAULTS.items():
        s.data[key] = value  # a stage trains on all its data: realignment's splits, sizes and noise are not its
    s.data.epochs = None  # a stage's length is its own steps
    s.eval.enabled, s.eval.policies = False, {}
    s.select = {"enabled": False}  # M_old follows pi_old: nothing may select it by pi_new
    s.probe = {"enabled": False}  # a stage's data have no held-out prompts to probe
    s.checkpoint = {"every_n_steps": None}  # a stage trains in a temporary folder that no re-run finds
    s.pop("judge", None)
    # Stage data come labelled (StageData.triaged) and a stage neither evaluates nor selects: no oracle is
    # asked anything, so none is built. The run's own could not serve: one bound to the dataset's
    # annotations (oracle=labels) cannot be bound to a stage's data, and one over an API needs no key here.
    s.oracle = {"_target_": "trace_realign.oracle.base.Oracle"}
    s.logger = {}
    s.seed = int(stage.get("seed", 0))
    s.paths.output_dir = str(out_dir)
    s.quiet = True  # an inner stage prints no summary of its own (its folder is temporary)
    s.method = OmegaConf.to_container(s.method, resolve=True)  # resolved against the stage's own settings
    return s


def method_config(name: str) -> DictConfig:
    """A method of the `method` config group by name (conf/method/NAME.yaml, its in-group defaults merged
    first, as Hydra composes it), unresolved: its interpolations read the config it joins."""
    root = resources.files("trace_realign.conf") / "method"
    path = root / f"{name}.yaml"
    if not path.is_file():
        known = sorted(f.name[:-5] for f in root.iterdir() if f.name.endswith(".yaml"))
        raise ValueError(f"model.prealign: unknown method {name!r}; expected one of {known}")
    own = OmegaConf.create(path.read_text())
    parents = own.pop("defaults", [])
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, method_config(str(parent)))
    return OmegaConf.merge(merged, own)


def stage_inputs(s: DictConfig, data_digest: str) -> dict[str, Any]:
    """Everything a stage run reads besides its starting model: its data's content and its settings."""
    c = OmegaConf.to_container(s, resolve=True)
    model = {k: c["model"].get(k) for k in ("dtype", "attn_implementation", "disable_dropout", "revision",
                                             "trust_remote_code")}
    data = {k: c["data"].get(k) for k in ("batch_size", "max_length", "max_prompt_length")}
    trainer = {k: c["trainer"].get(k) for k in ("max_steps", "gradient_clip_val", "precision", "accumulate_grad_batches")}
    return {"data": data_digest, "model": model, "method": c["method"], "loss": c["loss"],
            "objective": c["objective"], "optimizer": c["optimizer"], "scheduler": c.get("scheduler"),
            "batching": data, "trainer": trainer, "seed": c["seed"]}


def model_identity(path: str) -> str:
    """What names a starting model: a directory this package built is named by its own hash; any other
    local directory by its files' names, sizes and config; a hub id by itself."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha256(p.name.encode())
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p)}:{f.stat().st_size}".encode())
        if f.name.endswith(".json"):
            h.update(f.read_bytes())
    return f"{p.name}:{h.hexdigest()[:16]}"


def prealigned_model(
    cfg: DictConfig,
    base_path: str,
    run_stage: Callable[[DictConfig, Any], dict[str, Any]],
    source: Any,
    labels: str = "old",
    gold_punish: str = "correction",
    only: list[str] | None = None,
    prefix: str | None = None,
) -> tuple[str, dict[str, float]]:
    """The cached model built by the stages of `cfg.model.prealign` from `base_path` on `source`'s data
    (under pi_old's labels, or pi_new's: the re-training upper bound); each stage missing from the cache is
    built with `run_stage` (train.run). Returns the last stage's directory and the build's metrics
    (prefixed `prefix`/, by default prealign/ or retrain/).

    `only` runs just those stages, in the order model.prealign lists them: from M_old as `base_path`, the
    stages after pretraining re-run under pi_new's labels are fine-tuning with perfect labels (gold_finetune).

    Each stage is cached on its own, keyed by its inputs and the key of the stage before it, so builds
    that share a beginning share it on disk (the re-training upper bound reuses M_old's pretraining).
    """
    stages = cfg.model.prealign.stages
    if only is not None:
        unknown = [s for s in only if s not in stages]
        if unknown or not only:
            raise ValueError(f"method.retrain_stages: {list(only)} must name stages of model.prealign.stages "
                             f"({list(stages)})")
    root = Path(cfg.paths.cache_dir) / "prealign"
    prefix = prefix or ("prealign" if labels == "old" else "retrain")
    metrics: dict[str, float] = {}
    key = hashlib.sha256(json.dumps({"version": PREALIGN_VERSION, "base": model_identity(base_path)}).encode()).hexdigest()
    model_path, built, start = base_path, 0, time.time()
    # the stages train on the run's device with its threads (pinned before this is called)
    computed_by = arithmetic(device_for(str(cfg.trainer.get("accelerator", "auto"))))
    for name in stages:
        if only is not None and name not in only:
            continue
        data = StageData(source, name, labels, gold_punish)
        inputs = stage_inputs(stage_config(cfg, name, stages[name], base_path, root), pairs_digest(data.train_pairs()))
        blob = json.dumps({"previous": key, "stage": name, "arithmetic": computed_by, **inputs}, sort_keys=True,
                          default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()
        target = root / f"{name}-{key[:16]}"
        if not (target / "config.json").is_file():
            log.info("building %s: stage %s", BUILDS.get(prefix, prefix), name)
            _build_stage(stage_config(cfg, name, stages[name], model_path, root), data, run_stage, target, blob)
            built += 1
        info = json.loads((target / INFO_FILE).read_text()) if (target / INFO_FILE).is_file() else {}
        metrics.update({f"{prefix}/{name}/{k}": float(v) for k, v in info.items()})
        model_path = str(target)
    metrics[f"{prefix}/cached"] = float(built == 0)
    metrics[f"{prefix}/stages_built"] = float(built)
    # the time this run spent building (0 when every stage came from the cache); each stage's own
    # build time stays in <prefix>/<stage>/seconds
    metrics[f"{prefix}/seconds"] = time.time() - start if built else 0.0
    if built:
        log.info("%s ready at %s (%.0f s)", BUILDS.get(prefix, prefix), model_path,
                 metrics[f"{prefix}/seconds"])
    return model_path, metrics


def _build_stage(stage_cfg: DictConfig, data: StageData, run_stage: Callable[[DictConfig, Any], dict[str, Any]],
                 target: Path, blob: str) -> None:
    """One stage, trained in a temporary directory renamed into place when it has finished."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stage_cfg.paths.output_dir = str(work)
        m = run_stage(stage_cfg, data)
        info = {k.split("/")[-1]: float(v) for k, v in m.items() if k in ("train/first_loss", "train/loss", "train/seconds")}
        (work / "model" / INFO_FILE).write_text(json.dumps(info, indent=2))
        (work / "model" / "stage_key.json").write_text(blob)
        try:
            os.replace(work / "model", target)
        except OSError:  # another job finished the same stage first: its copy is equivalent
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
