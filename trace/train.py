"""`trace-realign`: the Hydra app. Glue only: build each part from config, triage, fit, evaluate, write.

    trace-realign                                   # the embedded default, on a CPU
    trace-realign loss=ipo ablation=no_kl trainer.max_steps=5
    trace-realign -m ablation=full,no_triage,no_impact,no_kl
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trace_realign.data import TriagedDataModule
from trace_realign.pipeline import DataPlan
from trace_realign.eval import evaluate
from trace_realign.model import load_tokenizer, resolve_model_path
from trace_realign.module import TraceModule
from trace_realign.objective import ObjectiveConfig
from trace_realign.oracle import NoisyOracle, build_oracles
from trace_realign.prealign import prealigned_model
from trace_realign.select import SelectByOracle
from trace_realign.sequences import SequenceLimits

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """One flat JSON object keyed by wandb-style paths."""
    flat = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()}
    path.write_text(json.dumps(dict(sorted(flat.items())), indent=2) + "\n")


def build_datamodule(
    cfg: DictConfig, source: Any, oracle: Any, tokenizer: Any, out: Path
) -> tuple[ObjectiveConfig, TriagedDataModule]:
    """The objective's term table and the DataModule that triages and serves for it."""
    ablation = cfg.ablation
    objective = ObjectiveConfig(
        beta=cfg.loss.beta,
        relational=cfg.loss.type,
        alpha_kl=cfg.objective.alpha_kl if ablation.kl else 0.0,
        reduction=cfg.objective.reduction,
        terms=OmegaConf.to_container(ablation.terms, resolve=True),
    )
    datamodule = TriagedDataModule(
        source=source,
        oracle=oracle,
        tokenizer=tokenizer,
        work_dir=out / "data",
        batch_size=cfg.data.batch_size,
        limits=SequenceLimits(cfg.data.max_length, cfg.data.max_prompt_length),
        use_triage=ablation.triage,
        terms=objective.terms,
        trust_labels=bool(getattr(source, "triaged", False)),
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        plan=data_plan(cfg.data),
        cache_dir=cfg.paths.cache_dir,
    )
    return objective, datamodule


def data_plan(data: DictConfig) -> DataPlan:
    splits = data.get("splits")
    return DataPlan(
        splits=OmegaConf.to_container(splits, resolve=True) if splits is not None else None,
        train_split=data.get("train_split", "train"),
        eval_split=data.get("eval_split"),
        size=data.get("size"),
        label_noise=float(data.get("label_noise", 0.0)),
        dpo_gold_punish=data.get("dpo_gold_punish", "keep"),
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """One realignment run; returns the metrics it wrote to metrics.json."""
    start = time.time()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    source = instantiate(cfg.dataset)
    # Noise (oracle.noise) reaches triage and selection only; evaluation always uses the clean judge.
    oracle, judge = build_oracles(cfg.oracle, cfg.seed, source)
    selector = oracle
    if cfg.get("judge"):
        # A separate judge (oracle@judge=openai) scores generations: for selection and evaluation, e.g.
        # when triage reads the dataset's labels, which know no model's text.
        _, judge = build_oracles(cfg.judge, cfg.seed, source, writer=False)
        selector = judge
    corpus = source.corpus() if cfg.model.get("build") else None
    model_path = resolve_model_path(cfg.model, corpus, cfg.paths.cache_dir)
    prealign_metrics: dict[str, float] = {}
    if cfg.model.get("prealign"):
        # M_old: the model aligned to pi_old that realignment starts from (built once, then cached).
        model_path, prealign_metrics = prealigned_model(cfg, model_path, run)
    tokenizer = load_tokenizer(model_path, cfg.model)

    ablation = cfg.ablation
    objective, datamodule = build_datamodule(cfg, source, oracle, tokenizer, out)
    # Triage before any model is trained: bad data and "nothing to re-align" fail here.
    datamodule.prepare_data()
    datamodule.setup("fit")

    module = TraceModule(
        model_path=model_path,
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        use_impact=ablation.impact,
        gamma=cfg.impact.gamma,
        gold_batch_size=cfg.impact.gold_batch_size,
        gold_chunk_size=cfg.impact.chunk_size,
        stop_grad_norm=cfg.objective.stop_grad_norm,
        seed=cfg.seed,
    )
    module.configure_model()
    loggers = build_loggers(cfg)
    callbacks = []
    select = cfg.get("select") or {}
    if select.get("enabled"):
        callbacks.append(SelectByOracle(
            datamodule.selection_prompts(int(select.prompts)), selector, source.new, tokenizer,
            every_n_steps=int(select.every_n_steps), max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        ))
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    metrics: dict[str, Any] = {**datamodule.stats, **prealign_metrics}
    metrics.update({
        "train/batch_size_effective": sum(datamodule.batch_size.values()) * trainer.accumulate_grad_batches * trainer.world_size,
        "train/world_size": trainer.world_size,
    })
    items = datamodule.eval_prompts()
    if cfg.eval.max_prompts:
        items = items[: cfg.eval.max_prompts]
    judge_kwargs = dict(oracle=judge, new=source.new, old=source.old, items=items,
                        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    if cfg.eval.enabled and cfg.eval.before and trainer.is_global_zero:
        before, _ = evaluate(module.policy, tokenizer, prefix="eval/before", **judge_kwargs)
        metrics.update(before)

    t_fit = time.time()
    trainer.fit(module, datamodule=datamodule)
    metrics.update({k: float(v) for k, v in module.impact_info.items()})
    metrics.update(module.last_losses)
    metrics.update(module.first_losses)
    for cb in callbacks:
        metrics.update(cb.metrics())
    if isinstance(oracle, NoisyOracle):
        metrics["oracle/noise"], metrics["oracle/noise_flipped"] = oracle.p, oracle.flipped
    metrics.update({"train/steps": trainer.global_step, "train/seconds": time.time() - t_fit,
                    "train/stopped_by_grad_norm": int(module.stop_reason == "grad_norm")})

    if trainer.is_global_zero:
        if cfg.eval.enabled:
            after, rows = evaluate(module.policy, tokenizer, prefix="eval/after", **judge_kwargs)
            metrics.update(after)
            with (out / "generations.jsonl").open("w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
        write_impact(out / "data" / "impact.jsonl", datamodule, module)
        save_dir = out / ("adapter" if cfg.model.lora.enabled else "model")
        module.policy.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        # an oracle that pays per call accounts for every call of the run (a noisy oracle's are its base's)
        paying = getattr(oracle, "base", oracle)
        if hasattr(paying, "metrics"):
            metrics.update(paying.metrics())
        if judge is not paying and hasattr(judge, "metrics"):
            metrics.update({k.replace("oracle/", "judge/", 1): v for k, v in judge.metrics().items()})
        metrics["time/total_seconds"] = time.time() - start
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        write_metrics(out / "metrics.json", metrics)
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        print_summary(out, metrics)
    return metrics


def write_impact(path: Path, datamodule: TriagedDataModule, module: TraceModule) -> None:
    """Each conflict pair with its raw impact score and final weight, for inspection."""
    weights, raw = module.weights.cpu().tolist(), module.impact_raw.tolist()
    with path.open("w") as fh:
        for k in range(datamodule.num_conflicts):
            category, _ = datamodule.conflict_row(k)
            pair = datamodule.conflict_pair(k)
            fh.write(json.dumps({"index": k, "category": category, "prompt": pair.prompt, "chosen": pair.chosen,
                                 "rejected": pair.rejected, "score": None if math.isnan(raw[k]) else raw[k], "weight": weights[k]}) + "\n")


def print_summary(out: Path, metrics: dict[str, Any], name: str = "trace-realign") -> None:
    keys = ["data/rows", "data/pairs", "triage/invert", "triage/punish", "triage/retain",
            "triage/excluded/oracle_failed", "triage/gt_accuracy", "data/train_pairs", "data/cache_hits",
            "oracle/calls", "oracle/cached", "oracle/failed", "oracle/cost_usd", "impact/nonzero", "train/loss",
            "eval/before/tpa", "eval/after/tpa", "eval/before/tpa/shifted", "eval/after/tpa/shifted",
            "eval/before/tpa_old/unchanged", "eval/after/tpa_old/unchanged", "eval/before/utility",
            "eval/after/utility", "select/best_step", "prealign/seconds", "time/total_seconds"]
    width = max(len(k) for k in keys)
    def show(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.4g}"

    lines = [f"  {k:<{width}}  {show(metrics[k])}" for k in keys if k in metrics]
    print(f"\n{name}: outputs in {out}\n" + "\n".join(lines), flush=True)


def finish_loggers() -> None:
    """wandb logs every multirun job into one run unless each is finished, even after a failure."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


@hydra.main(version_base="1.3", config_path="pkg://trace_realign.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    finally:
        finish_loggers()
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
