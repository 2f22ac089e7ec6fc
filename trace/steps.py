"""The steps both apps are glue around: build each part from config, evaluate, write.

`trace-realign` (train.py) builds the data, the judges, the model and the module, evaluates, fits,
evaluates again and writes; `trace-eval` (evaluate.py) builds the judges and models and evaluates;
`trace-data` (prepare.py) builds the data alone. Each step is here once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trace_realign.core.environment import device_for
from trace_realign.core.sequences import SequenceLimits
from trace_realign.data.pipeline import DataPlan
from trace_realign.data.sources import load_any_policy
from trace_realign.eval import EvalInputs, GenerationSettings, build_evaluators, run_evaluators, verdict
from trace_realign.method.ablation import ablate
from trace_realign.method.datamodule import TriagedDataModule
from trace_realign.method.module import TraceModule
from trace_realign.method.objective import ObjectiveConfig
from trace_realign.oracle.base import build_oracles

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
    method = ablate(cfg).method
    check_method(method)
    loss = {**OmegaConf.to_container(cfg.loss, resolve=True), **(OmegaConf.to_container(method, resolve=True)["loss"] or {})}
    objective = ObjectiveConfig(
        beta=float(loss["beta"]),
        relational=loss["type"],
        label_smoothing=float(loss.get("label_smoothing") or 0.0),
        alpha_kl=float(method.alpha_kl),
        nll_weight=float(method.nll.weight),
        nll_categories=tuple(method.nll.categories),
        reduction=cfg.objective.reduction,
        terms=OmegaConf.to_container(method.terms, resolve=True),
        weighted=tuple(method.weighted),
        fused_forward=cfg.objective.get("fused_forward", True),
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


METHOD_KEYS = {"name", "triage", "untriaged", "terms", "weights", "weighted", "alpha_kl", "tuned_as", "nll", "loss",
               "retrain", "retrain_from", "retrain_stages"}
WEIGHTS = ("impact", "uniform")
RETRAIN_FROM = ("base", "m_old")


def check_method(method: DictConfig) -> None:
    """A method config names every key of the schema (conf/method/trace.yaml) and no other."""
    keys = set(method.keys())
    if keys - METHOD_KEYS or METHOD_KEYS - keys:
        raise ValueError(f"method {method.get('name')!r}: unknown keys {sorted(keys - METHOD_KEYS)}, missing keys "
                         f"{sorted(METHOD_KEYS - keys)}; a method lists {sorted(METHOD_KEYS)} (conf/method/trace.yaml)")
    if method.weights not in WEIGHTS:
        raise ValueError(f"method.weights: {method.weights!r}; expected one of {WEIGHTS}")
    if method.retrain_from not in RETRAIN_FROM:
        raise ValueError(f"method.retrain_from: {method.retrain_from!r}; expected one of {RETRAIN_FROM}")


def data_plan(data: DictConfig) -> DataPlan:
    splits = data.get("splits")
    return DataPlan(
        splits=OmegaConf.to_container(splits, resolve=True) if isinstance(splits, DictConfig) else splits,
        train_split=data.get("train_split", "train"),
        eval_split=data.get("eval_split"),
        size=data.get("size"),
        label_noise=float(data.get("label_noise", 0.0)),
        noise_style=data.get("noise_style", "category"),
        dpo_gold_punish=data.get("dpo_gold_punish", "keep"),
    )


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
        impact_method=cfg.impact.get("method", "batched"),
        impact_batch_size=cfg.impact.get("batch_size", 8),
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


def eval_policies(cfg: DictConfig, source: Any) -> dict[str, Any]:
    """eval.policies ({label: policy name or file}) as the source's policies, for agreement beside TPA."""
    named = dict(cfg.eval.get("policies") or {}) if cfg.eval.enabled else {}
    bad = [label for label in named if not str(label).replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"eval.policies: labels {bad} must be letters, digits and underscores (they name metrics)")
    # a source that knows its own policies loads them (the world's by name); any other, every kind of file
    load = getattr(source, "policy", None) or load_any_policy
    return {str(label): load(str(name)) for label, name in named.items()}


def build_evaluation(cfg: DictConfig, judge: Any, new: Any, old: Any, items: list[dict[str, Any]], out: Path,
                     progress: bool = True, policies: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything evaluate_model needs apart from the model: the evaluators of eval.evaluators, the
    judge, the policies, the held-out items and the generation settings (eval.*)."""
    ev = cfg.eval
    sampling = ev.get("sampling") or {}
    settings = GenerationSettings(
        max_new_tokens=int(ev.max_new_tokens), batch_size=int(ev.batch_size),
        samples=int(sampling.get("samples") or 0), temperature=float(sampling.get("temperature", 1.0)),
        top_p=float(sampling.get("top_p", 1.0)), seed=int(sampling.get("seed", cfg.seed)),
    )
    evaluators = build_evaluators(ev.get("evaluators")) if ev.enabled else {}
    return dict(evaluators=evaluators, judge=judge, new=new, old=old, items=items, settings=settings,
                out=out, progress=progress, policies=dict(policies or {}))


def eval_device(cfg: DictConfig) -> torch.device:
    """Where trace-eval runs the models: the trainer's accelerator (a GPU when it names or finds one)."""
    return device_for(str(cfg.trainer.get("accelerator", "auto")))


def evaluate_model(evaluation: dict[str, Any], model: torch.nn.Module, tokenizer: Any, when: str
                   ) -> tuple[dict[str, float], dict[int, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every configured evaluator on one model: metrics under eval/<when>/, rows per held-out item, and
    other rows by evaluator."""
    inputs = EvalInputs(
        model=model, tokenizer=tokenizer, judge=evaluation["judge"], new=evaluation["new"], old=evaluation["old"],
        items=evaluation["items"], generation=evaluation["settings"], work_dir=evaluation["out"] / "eval" / when,
        when=when, progress=evaluation["progress"], policies=evaluation.get("policies", {}),
    )
    return run_evaluators(evaluation["evaluators"], inputs)


def write_eval_rows(out: Path, when: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    """An evaluator's own records (attacked prompts and their verdicts, say) to eval/<when>/<name>.jsonl."""
    for name, records in rows.items():
        path = out / "eval" / when / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_generations(path: Path, items: list[dict[str, Any]], rows: dict[str, dict[int, dict[str, Any]]]) -> None:
    """Each held-out prompt with the response before and after, and each verdict, to check by eye."""
    with path.open("w", encoding="utf-8") as fh:
        for i, item in enumerate(items):
            line = {**item, **{when: r[i] for when, r in rows.items() if i in r}}
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def print_summary(out: Path, metrics: dict[str, Any], name: str = "trace-realign") -> None:
    keys = ["data/rows", "data/pairs", "triage/invert", "triage/punish", "triage/retain",
            "triage/excluded/oracle_failed", "triage/excluded/undecided", "triage/gt_accuracy", "data/train_pairs",
            "data/cache_hits", "oracle/calls", "oracle/cached", "oracle/failed", "oracle/cost_usd", "impact/nonzero",
            "train/steps", "train/loss", "select/best_step", "prealign/seconds", "retrain/seconds", "finetune/seconds", "time/total_seconds"]
    width = max(len(k) for k in keys)

    def show(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.4g}"

    def value(k: str) -> str:
        # a model read from the cache took no time to build: say so, not "0"
        stage = k.removesuffix("/seconds")
        return "cached" if k != "time/total_seconds" and metrics.get(f"{stage}/cached") == 1 else show(metrics[k])

    lines = [f"  {k:<{width}}  {value(k)}" for k in keys if k in metrics]
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


def user_errors() -> tuple[type[BaseException], ...]:
    """What bad input, a bad setting or an unusable service raises: the message says what is wrong and
    where, so the console shows it alone (no traceback; HYDRA_FULL_ERROR=1 shows one)."""
    from trace_realign.core import rundir
    from trace_realign.data.sources import NoConflictsError
    from trace_realign.eval.base import JudgeFailed
    from trace_realign.models.loading import ModelNotFoundError
    from trace_realign.oracle.base import OracleFailuresError
    from trace_realign.oracle.llm import OracleConfigError

    return (ValueError, FileNotFoundError, ModelNotFoundError, OracleConfigError, OracleFailuresError,
            NoConflictsError, JudgeFailed, rundir.RunDirError)


def run_app(run: Callable[[DictConfig], dict[str, Any]], cfg: DictConfig, app: str = "trace-realign"
            ) -> dict[str, Any]:
    """An app's run, with what every app owes its folder: a failure recorded there (FAILED, with its
    traceback, no metrics.json) unless the folder is another run's, and wandb finished either way. A user's
    error ends the app with its message and exit code 1, no traceback (HYDRA_FULL_ERROR=1 raises it)."""
    from trace_realign.core import rundir
    from trace_realign.method.datamodule import launched_as_rank_zero

    out = Path(cfg.paths.output_dir)
    try:
        try:
            return run(cfg)
        except rundir.RunDirError:
            raise  # the folder is another run's: leave it exactly as it was
        except BaseException as exc:
            if launched_as_rank_zero():
                rundir.record_failure(out, exc)
            raise
        finally:
            finish_loggers()
    except user_errors() as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        kept = f" (traceback in {out / rundir.FAILED_FILE})" if (out / rundir.FAILED_FILE).is_file() else ""
        print(f"{app}: error: {exc}{kept}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
