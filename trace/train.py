"""`trace-realign`: the Hydra app. Glue only: build each part from config, triage, fit, evaluate, write.

    trace-realign                                   # the embedded default, on a CPU
    trace-realign loss=ipo method=no_kl trainer.max_steps=5
    trace-realign -m method=trace,no_triage,no_impact,no_kl
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
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trace_realign import rundir
from trace_realign.data import TriagedDataModule, launched_as_rank_zero
from trace_realign.pipeline import DataPlan
from trace_realign.eval import evaluate, verdict
from trace_realign.logs import framework_quiet
from trace_realign.model import load_policy, load_tokenizer, resolve_model_path
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
    """The method's objective (its term table over the loss group's settings) and the DataModule that
    triages and serves for it."""
    method = cfg.method
    check_method(method)
    loss = {**OmegaConf.to_container(cfg.loss, resolve=True), **(OmegaConf.to_container(method, resolve=True)["loss"] or {})}
    objective = ObjectiveConfig(
        beta=float(loss["beta"]),
        relational=loss["type"],
        label_smoothing=float(loss.get("label_smoothing") or 0.0),
        alpha_kl=float(method.alpha_kl),
        reduction=cfg.objective.reduction,
        terms=OmegaConf.to_container(method.terms, resolve=True),
        weighted=tuple(method.weighted),
    )
    datamodule = TriagedDataModule(
        source=source,
        oracle=oracle,
        tokenizer=tokenizer,
        work_dir=out / "data",
        batch_size=cfg.data.batch_size,
        limits=SequenceLimits(cfg.data.max_length, cfg.data.max_prompt_length),
        use_triage=method.triage,
        terms=objective.terms,
        weighted=objective.weighted,
        untriaged=method.get("untriaged") or "punish",
        trust_labels=bool(getattr(source, "triaged", False)),
        seed=cfg.seed,
        num_workers=cfg.data.num_workers,
        plan=data_plan(cfg.data),
        cache_dir=cfg.paths.cache_dir,
    )
    return objective, datamodule


METHOD_KEYS = {"name", "triage", "untriaged", "terms", "weights", "weighted", "alpha_kl", "loss", "retrain"}
WEIGHTS = ("impact", "uniform")


def check_method(method: DictConfig) -> None:
    """A method config names every key of the schema (conf/method/trace.yaml) and no other."""
    keys = set(method.keys())
    if keys - METHOD_KEYS or METHOD_KEYS - keys:
        raise ValueError(f"method {method.get('name')!r}: unknown keys {sorted(keys - METHOD_KEYS)}, missing keys "
                         f"{sorted(METHOD_KEYS - keys)}; a method lists {sorted(METHOD_KEYS)} (conf/method/trace.yaml)")
    if method.weights not in WEIGHTS:
        raise ValueError(f"method.weights: {method.weights!r}; expected one of {WEIGHTS}")


def data_plan(data: DictConfig) -> DataPlan:
    splits = data.get("splits")
    return DataPlan(
        splits=OmegaConf.to_container(splits, resolve=True) if splits is not None else None,
        train_split=data.get("train_split", "train"),
        eval_split=data.get("eval_split"),
        size=data.get("size"),
        label_noise=float(data.get("label_noise", 0.0)),
        noise_style=data.get("noise_style", "category"),
        dpo_gold_punish=data.get("dpo_gold_punish", "keep"),
    )


def run(cfg: DictConfig, source: Any = None) -> dict[str, Any]:
    """One realignment run; returns the metrics it wrote to metrics.json. `source` stands in for
    cfg.dataset (the stages that build M_old pass theirs)."""
    start = time.time()
    out = Path(cfg.paths.output_dir)
    quiet = bool(cfg.get("quiet", False))
    if launched_as_rank_zero():
        rundir.claim(out, cfg)  # a folder holding another configuration's run stops us here
    pin_threads(cfg.get("threads"))
    seed_everything(cfg.seed)

    source = source if source is not None else instantiate(cfg.dataset)
    oracle, judge, selector = build_judges(cfg, source)
    select = cfg.get("select") or {}

    method = cfg.method
    objective, datamodule = build_datamodule(cfg, source, oracle, None, out)
    # Triage before any model work: bad data, an oracle that fails and "nothing to re-align" stop here.
    t0 = time.time()
    datamodule.prepare_data()
    timings = {"time/data_seconds": time.time() - t0}

    corpus = source.corpus() if cfg.model.get("build") else None
    base_path = resolve_model_path(cfg.model, corpus, cfg.paths.cache_dir)
    model_path, metrics = base_path, {}
    if cfg.model.get("prealign"):
        # M_old: the model aligned to pi_old that realignment starts from (built once, then cached).
        model_path, built = prealigned_model(cfg, base_path, run, source)
        metrics.update(built)
    tokenizer = load_tokenizer(model_path, cfg.model)
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    # Whatever ran above (building M_old) has moved the random generators: realignment starts from the
    # seed alone, so a run that builds M_old and one that loads it give the same result.
    seed_everything(cfg.seed)

    module = build_module(cfg, model_path, objective)
    loggers = build_loggers(cfg)
    callbacks = []
    if select.get("enabled"):
        callbacks.append(SelectByOracle(
            datamodule.selection_prompts(int(select.prompts)), selector, source.new, tokenizer,
            every_n_steps=int(select.every_n_steps), max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
        ))
    with framework_quiet(quiet):
        trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)

    metrics.update(datamodule.stats)
    metrics.update({
        "train/batch_size_effective": sum(datamodule.batch_size.values()) * trainer.accumulate_grad_batches * trainer.world_size,
        "train/world_size": trainer.world_size,
    })
    items = datamodule.eval_prompts()
    if cfg.eval.max_prompts:
        items = items[: cfg.eval.max_prompts]
    judging = dict(oracle=judge, new=source.new, old=source.old, items=items,
                   max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    rows: dict[str, list[dict[str, Any]]] = {}
    if cfg.eval.enabled and cfg.eval.before and trainer.is_global_zero:
        t0 = time.time()
        before, rows["before"] = evaluate(module.policy, tokenizer, prefix="eval/before", **judging)
        metrics.update(before)
        timings["time/eval_before_seconds"] = time.time() - t0

    t_fit = time.time()
    final = module.policy
    if method.retrain:
        # The full re-training upper bound: no realignment of M_old; the pipeline that built it, re-run
        # from the base model with pi_new's labels, gives the model evaluated "after".
        gold_path, built = prealigned_model(cfg, base_path, run, source, labels="new",
                                            gold_punish=str(cfg.data.dpo_gold_punish))
        metrics.update(built)
        final = load_policy(gold_path, {**OmegaConf.to_container(cfg.model, resolve=True), "lora": {"enabled": False}})[0]
        steps = 0
    else:
        with framework_quiet(quiet):
            trainer.fit(module, datamodule=datamodule)
        steps = trainer.global_step
        for cb in callbacks:
            metrics.update(cb.metrics())
        timings["time/impact_seconds"] = module.impact_seconds
        timings["time/select_seconds"] = sum(getattr(cb, "seconds", 0.0) for cb in callbacks)
        metrics.update({k: float(v) for k, v in module.impact_info.items()})
        metrics.update(module.last_losses)
        metrics.update(module.first_losses)
        metrics["train/stopped_by_grad_norm"] = int(module.stop_reason == "grad_norm")
    if isinstance(oracle, NoisyOracle):
        metrics["oracle/noise"], metrics["oracle/noise_flipped"] = oracle.p, oracle.flipped
    metrics.update({"train/steps": steps, "train/seconds": time.time() - t_fit})

    if trainer.is_global_zero:
        if cfg.eval.enabled:
            t0 = time.time()
            after, rows["after"] = evaluate(final, tokenizer, prefix="eval/after", **judging)
            metrics.update(after)
            timings["time/eval_after_seconds"] = time.time() - t0
            write_generations(out / "generations.jsonl", items, rows)
        if not method.retrain:
            write_impact(out / "data" / "impact.jsonl", datamodule, module)
        save_dir = out / ("adapter" if cfg.model.lora.enabled and not method.retrain else "model")
        final.save_pretrained(save_dir)
        tokenizer.save_pretrained(save_dir)
        # an oracle that pays per call accounts for every call of the run (a noisy oracle's are its base's)
        paying = getattr(oracle, "base", oracle)
        if hasattr(paying, "metrics"):
            metrics.update(paying.metrics())
        if judge is not paying and hasattr(judge, "metrics"):
            metrics.update({k.replace("oracle/", "judge/", 1): v for k, v in judge.metrics().items()})
        metrics.update(timings)
        metrics["time/total_seconds"] = time.time() - start
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        write_metrics(out / "metrics.json", metrics)
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=steps)
        if not quiet:
            print_summary(out, metrics)
    return metrics


def build_judges(cfg: DictConfig, source: Any) -> tuple[Any, Any, Any]:
    """(the oracle triage asks, the clean judge evaluation asks, the oracle selection asks).

    Noise (oracle.noise) reaches triage and selection only; evaluation always uses the clean judge. A
    separate judge (oracle@judge=openai) scores generations, for selection and evaluation, e.g. when
    triage reads the dataset's labels, which know no model's text.
    """
    oracle, judge = build_oracles(cfg.oracle, cfg.seed, source)
    selector = oracle
    if cfg.get("judge"):
        _, judge = build_oracles(cfg.judge, cfg.seed, source, writer=False)
        selector = judge
    select = cfg.get("select") or {}
    require_text_judge(judge, evaluates=bool(cfg.eval.enabled), selects=bool(select.get("enabled")))
    return oracle, judge, selector


def build_module(cfg: DictConfig, model_path: str, objective: ObjectiveConfig) -> TraceModule:
    """The LightningModule on `model_path` (M_old), its adapters or copy created."""
    module = TraceModule(
        model_path=model_path,
        model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
        objective=objective,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        use_impact=cfg.method.weights == "impact",
        gamma=cfg.impact.gamma,
        gold_batch_size=cfg.impact.gold_batch_size,
        gold_chunk_size=cfg.impact.chunk_size,
        stop_grad_norm=cfg.objective.stop_grad_norm,
        seed=cfg.seed,
        top_k=cfg.impact.get("top_k"),
    )
    module.configure_model()
    return module


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)


def pin_threads(threads: int | None) -> None:
    """Set torch's CPU threads when the config names a count (the sums of a matmul depend on it)."""
    if threads:
        torch.set_num_threads(int(threads))


def require_text_judge(judge: Any, evaluates: bool, selects: bool) -> None:
    """Evaluation and selection judge the model's own text: refuse before any work if the judge cannot."""
    if getattr(judge, "judges_text", True) or not (evaluates or selects):
        return
    uses = " and ".join(n for n, on in (("evaluation", evaluates), ("selection (select.enabled)", selects)) if on)
    raise ValueError(
        f"{uses} judge the model's generations, but {type(judge).__name__} judges annotated responses only. "
        "Add a judge that reads text (e.g. oracle@judge=openai), or set eval.enabled=false select.enabled=false")


def write_generations(path: Path, items: list[dict[str, Any]], rows: dict[str, list[dict[str, Any]]]) -> None:
    """Each held-out prompt with the response before and after, and each verdict, to check by eye."""
    with path.open("w", encoding="utf-8") as fh:
        for i, item in enumerate(items):
            line = {**item, **{when: r[i] for when, r in rows.items() if i < len(r)}}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


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
            "triage/excluded/oracle_failed", "triage/excluded/undecided", "triage/gt_accuracy", "data/train_pairs",
            "data/cache_hits", "oracle/calls", "oracle/cached", "oracle/failed", "oracle/cost_usd", "impact/nonzero",
            "train/steps", "train/loss", "select/best_step", "prealign/seconds", "retrain/seconds", "time/total_seconds"]
    width = max(len(k) for k in keys)

    def show(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.4g}"

    lines = [f"  {k:<{width}}  {show(metrics[k])}" for k in keys if k in metrics]
    text = f"\n{name}: outputs in {out}\n" + "\n".join(lines)
    judged = verdict(metrics)
    if judged:
        text += "\n\n" + "\n".join(judged)
    print(text, flush=True)


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
    except rundir.RunDirError:
        raise  # the folder is another run's: leave it exactly as it was
    except BaseException as exc:
        if launched_as_rank_zero():
            rundir.record_failure(Path(cfg.paths.output_dir), exc)
        raise
    finally:
        finish_loggers()
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
