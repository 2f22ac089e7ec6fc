"""`trace-realign`: the Hydra app. Glue only: build each part from config, triage, fit, evaluate, write.

    trace-realign                                   # the embedded default, on a CPU
    trace-realign loss=ipo ablation=no_kl trainer.max_steps=5
    trace-realign -m ablation=none,no_triage,no_impact,no_kl
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
from omegaconf import DictConfig, OmegaConf, open_dict

from trace_realign.core import rundir
from trace_realign.core.logs import StepProgressBar, framework_quiet
from trace_realign.core.progress import on_terminal
from trace_realign.core.sequences import SequenceLimits
from trace_realign.eval import cache as eval_cache
from trace_realign.eval.likelihood import LikelihoodProbe, probe_items
from trace_realign.method import resume
from trace_realign.method.ablation import ablate
from trace_realign.method.datamodule import TriagedDataModule, launched_as_rank_zero
from trace_realign.method.module import TraceModule
from trace_realign.method.select import SelectByOracle
from trace_realign.method.shifts import chain_policies, check_chain, drift_lines, run_shifts
from trace_realign.method.strategies import check_distributed
from trace_realign.models.from_run import model_from_run
from trace_realign.models.loading import load_for_eval, load_tokenizer, load_trainable, resolve_model_path
from trace_realign.models.prealign import prealigned_model
from trace_realign.oracle.base import NoisyOracle
from trace_realign.steps import (
    build_datamodule,
    build_evaluation,
    build_judges,
    build_loggers,
    build_module,
    eval_device,
    eval_policies,
    evaluate_model,
    pin_threads,
    print_summary,
    run_app,
    seed_everything,
    write_eval_rows,
    write_generations,
    write_metrics,
)

log = logging.getLogger(__name__)


def run(cfg: DictConfig, source: Any = None) -> dict[str, Any]:
    """One realignment run; returns the metrics it wrote to metrics.json. `source` stands in for
    cfg.dataset (the stages that build M_old pass theirs)."""
    start = time.time()
    ablate(cfg)  # ablation=...: the method's table with one component changed, before anything reads it
    if (cfg.get("shifts") or {}).get("policies"):
        return run_chain(cfg)  # successive policy shifts: one run per shift (method/shifts.py)
    out = Path(cfg.paths.output_dir)
    quiet = bool(cfg.get("quiet", False))
    check_distributed(cfg)  # a trainer that cannot carry this run stops here, before any oracle call
    if cfg.method.retrain and not cfg.model.get("prealign"):
        raise ValueError(f"method={cfg.method.name} re-runs the pipeline that built M_old (model.prealign) with "
                         f"pi_new's labels, and model {cfg.model.get('name_or_path')} has none: it needs a model "
                         "aligned by this package (model=tiny) and a dataset that knows pi_new's labels "
                         "(dataset=embedded); for a hub model use method=dpo_gold")
    # a run that wrote metrics.json finished: its re-run starts afresh; one that did not resumes (resume.py)
    finished = (out / "metrics.json").is_file()
    if launched_as_rank_zero():
        rundir.claim(out, cfg)  # a folder holding another configuration's run stops us here
    ckpt = resume.resume_point(out, finished and launched_as_rank_zero())
    pin_threads(cfg.get("threads"))
    if launched_as_rank_zero():
        rundir.record_environment(out, eval_device(cfg))  # after the threads are pinned: what it runs under
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
    if cfg.model.get("from_run"):
        # a later policy shift: the model a prior run realigned is this run's M_old (models/from_run.py)
        model_path = model_from_run(cfg.model.from_run, OmegaConf.to_container(cfg.model, resolve=True),
                                    cfg.paths.cache_dir)
    elif cfg.model.get("prealign"):
        # M_old: the model aligned to pi_old that realignment starts from (built once, then cached).
        model_path, built = prealigned_model(cfg, base_path, run, source)
        metrics.update(built)
    tokenizer = load_tokenizer(model_path, cfg.model)
    datamodule.tokenizer = tokenizer
    datamodule.setup("fit")
    if cfg.data.get("epochs"):
        # T_max from passes over the data (the reference trains one epoch); the schedule reads the same
        devices = cfg.trainer.get("devices")
        steps = datamodule.steps_for_epochs(float(cfg.data.epochs), devices if isinstance(devices, int) and devices > 0 else 1)
        with open_dict(cfg):
            cfg.trainer.max_steps = steps
        metrics["train/epochs"] = float(cfg.data.epochs)
    # Whatever ran above (building M_old) has moved the random generators: realignment starts from the
    # seed alone, so a run that builds M_old and one that loads it give the same result.
    seed_everything(cfg.seed)

    module = build_module(cfg, model_path, objective)
    loggers = build_loggers(cfg)
    # The bar is drawn on a terminal only, as every other bar (core/progress.py): into a log or a pipe, Rich's
    # live display would redraw from a thread of its own for nobody
    bar = bool(cfg.trainer.get("enable_progress_bar", True)) and on_terminal()
    callbacks: list[L.Callback] = [StepProgressBar()] if bar else []
    if select.get("enabled"):
        callbacks.append(SelectByOracle(
            datamodule.selection_prompts(int(select.prompts)), selector, source.new, tokenizer,
            every_n_steps=int(select.every_n_steps), max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size, keep_last=bool(select.get("eval_last")),
        ))
    probe_cfg = cfg.get("probe") or {}
    if probe_cfg.get("enabled"):
        callbacks.append(LikelihoodProbe(
            probe_items(source, datamodule.eval_prompts(), int(probe_cfg.prompts)), tokenizer,
            SequenceLimits(cfg.data.max_length, cfg.data.max_prompt_length), int(probe_cfg.every_n_steps)))
    every = resume.checkpoint_every(cfg)
    if every and not method.retrain:
        callbacks.append(resume.StepCheckpoint(resume.checkpoint_path(out), every))  # last: after selection's check
    with framework_quiet(quiet):
        trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, enable_progress_bar=bar)

    metrics.update(datamodule.stats)
    metrics.update({
        "train/batch_size_effective": sum(datamodule.batch_size.values()) * trainer.accumulate_grad_batches * trainer.world_size,
        "train/world_size": trainer.world_size,
    })
    items = datamodule.eval_prompts()
    if cfg.eval.max_prompts:
        items = items[: cfg.eval.max_prompts]
    evaluation = build_evaluation(cfg, judge, source.new, source.old, items, out, progress=not quiet,
                                  policies=eval_policies(cfg, source))
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    device = trainer.strategy.root_device  # evaluation runs where training will (a GPU at full scale)
    if cfg.eval.enabled and cfg.eval.before and trainer.is_global_zero:
        t0 = time.time()

        def evaluate() -> eval_cache.Evaluation:
            module.policy.to(device)
            return evaluate_model(evaluation, module.policy, tokenizer, "before")

        # M_old's evaluation is every method's of a seed: read from the cache where it was stored (eval/cache.py)
        before, rows["before"], other, cached = eval_cache.evaluate_before(cfg, model_path, evaluation, device, out, evaluate)
        write_eval_rows(out, "before", other)
        metrics.update(before)
        metrics["eval/before_cached"] = float(cached)
        timings["time/eval_before_seconds"] = time.time() - t0

    t_fit = time.time()
    on_cuda = device.type == "cuda"
    # this rank's peak over the fit (impact scores, selection and steps), not the evaluation before; CUDA's
    # allocator refuses a reset before its first allocation (nothing to reset then: a prealign stage)
    if on_cuda and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(device)
    final = module.policy
    if method.retrain:
        # The references with perfect labels: the pipeline that built M_old re-run with pi_new's labels,
        # from the base model (full re-training, the upper bound) or, for the stages method.retrain_stages
        # names, from M_old itself (fine-tuning with perfect labels, gold_finetune). Its result is "after".
        from_m_old = method.get("retrain_from", "base") == "m_old"
        gold_path, built = prealigned_model(cfg, model_path if from_m_old else base_path, run, source, labels="new",
                                            gold_punish=str(cfg.data.dpo_gold_punish),
                                            only=list(method.retrain_stages) if method.get("retrain_stages") else None,
                                            prefix="finetune" if from_m_old else "retrain")
        metrics.update(built)
        final = load_for_eval(gold_path, OmegaConf.to_container(cfg.model, resolve=True)).to(device)
        steps = 0
    else:
        if ckpt is not None:
            log.info("resuming the unfinished run in %s from %s", out, ckpt)
        with framework_quiet(quiet):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        steps = trainer.global_step
        if trainer.is_global_zero:
            final = module.final_policy()  # under FSDP, a whole copy with the gathered parameters
        for cb in callbacks:
            if hasattr(cb, "metrics"):
                metrics.update(cb.metrics())
        timings["time/impact_seconds"] = module.impact_seconds
        timings["time/select_seconds"] = sum(getattr(cb, "seconds", 0.0) for cb in callbacks)
        metrics.update({k: float(v) for k, v in module.impact_info.items()})
        if module.use_impact:
            metrics["impact/method"] = module.impact_method
            metrics["impact/seconds"] = module.impact_seconds
        metrics.update(module.last_losses)
        metrics.update(module.first_losses)
        metrics["train/stopped_by_grad_norm"] = int(module.stop_reason == "grad_norm")
    if isinstance(oracle, NoisyOracle):
        metrics["oracle/noise"], metrics["oracle/noise_flipped"] = oracle.p, oracle.flipped
    metrics.update({"train/steps": steps, "train/seconds": time.time() - t_fit,
                    "train/resumed_from_step": module.resumed_from_step})
    if on_cuda:
        metrics["train/peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20

    if trainer.is_global_zero:
        if cfg.eval.enabled:
            t0 = time.time()
            after, rows["after"], other = evaluate_model(evaluation, final, tokenizer, "after")
            write_eval_rows(out, "after", other)
            metrics.update(after)
            timings["time/eval_after_seconds"] = time.time() - t0
            if select.get("enabled") and select.get("eval_last") and not method.retrain:
                selector_cb = next(cb for cb in callbacks if isinstance(cb, SelectByOracle))
                metrics.update(evaluate_last(evaluation, final, tokenizer, selector_cb, after, rows, out))
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
        resume.discard(out)  # finished: the saved adapter or model is the result, the checkpoints are spent
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=steps)
        if not quiet:
            print_summary(out, metrics)
    return metrics


def run_chain(cfg: DictConfig) -> dict[str, Any]:
    """shifts.policies: every shift an ordinary run in <output_dir>/shift<k>; the chain's folder holds its
    config, every shift's metrics (shift<k>/...) and the drift of agreement across shifts."""
    out = Path(cfg.paths.output_dir)
    check_chain(cfg)
    if launched_as_rank_zero():
        rundir.claim(out, cfg)
    metrics = run_shifts(cfg, run)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    write_metrics(out / "metrics.json", metrics)
    if not cfg.get("quiet", False):
        print(f"\ntrace-realign: {len(chain_policies(cfg)) - 1} shifts in {out} (shift<k>/ each)", flush=True)
        print("\n".join(drift_lines(metrics, chain_policies(cfg))), flush=True)
    return metrics


def evaluate_last(evaluation: Any, policy: torch.nn.Module, tokenizer: Any, selector: SelectByOracle,
                  after: dict[str, Any], rows: dict[str, Any], out: Path) -> dict[str, Any]:
    """eval/last/*: the last step's parameters evaluated as "after" was (the run as T_max alone would have
    ended it); when selection kept the last step they are "after" itself. The kept parameters go back."""
    if selector.last_state is None:
        return {k.replace("eval/after/", "eval/last/", 1): v for k, v in after.items()}
    load_trainable(policy, selector.last_state)
    last, rows["last"], other = evaluate_model(evaluation, policy, tokenizer, "last")
    write_eval_rows(out, "last", other)
    assert selector.best_state is not None
    load_trainable(policy, selector.best_state)
    return last


def write_impact(path: Path, datamodule: TriagedDataModule, module: TraceModule) -> None:
    """Each conflict pair with its raw impact score and final weight, for inspection."""
    weights, raw = module.weights.cpu().tolist(), module.impact_raw.tolist()
    with path.open("w") as fh:
        for k in range(datamodule.num_conflicts):
            category, _ = datamodule.conflict_row(k)
            pair = datamodule.conflict_pair(k)
            fh.write(json.dumps({"index": k, "category": category, "prompt": pair.prompt, "chosen": pair.chosen,
                                 "rejected": pair.rejected, "score": None if math.isnan(raw[k]) else raw[k], "weight": weights[k]}) + "\n")


@hydra.main(version_base="1.3", config_path="pkg://trace_realign.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_app(run, cfg)
    value = metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
