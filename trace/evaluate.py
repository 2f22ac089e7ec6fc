"""`trace-eval`: evaluate any model with the evaluators `trace-realign` uses before and after training.

    trace-eval                                                      # M_old of the embedded default
    trace-eval 'models={trace: outputs/trace/<time>, m_old: base:outputs/trace/<time>}'
    trace-eval 'models={gold: RUN1, trace: RUN2, u2a: RUN3}' eval.preference.enabled=true

Each model (a run folder, the base it started from, M_old, a model folder or a hub id) goes through the
same evaluators (conf/eval/) on the same held-out prompts; metrics.json holds eval/<label>/... for each,
with the keys trace-realign writes under eval/before and eval/after. With several models, the preference
kit (eval.preference) exports blind comparisons of their responses and, with an annotator configured,
computes win rates and agreement.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trace_realign.core import rundir
from trace_realign.core.logs import framework_quiet
from trace_realign.core.records import load_eval_prompts
from trace_realign.core.rundir import flat_config
from trace_realign.data.pipeline import EVAL_FILE
from trace_realign.method.datamodule import launched_as_rank_zero
from trace_realign.models.loading import load_for_eval, load_tokenizer, resolve_model_path
from trace_realign.steps import (
    build_datamodule,
    build_evaluation,
    build_judges,
    eval_device,
    eval_policies,
    evaluate_model,
    pin_threads,
    run_app,
    seed_everything,
    write_eval_rows,
    write_generations,
    write_metrics,
)

log = logging.getLogger(__name__)

RESERVED_LABELS = ("before", "after", "preference")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: its label, what kind of thing it is and where it lies."""

    label: str
    kind: str  # m_old | base | run | folder | hub
    path: str | None = None  # the folder or id to load (None for m_old until it is built)
    run: Path | None = None  # the run folder it belongs to, if any


def resolve_target(label: str, spec: str) -> Target:
    """What models.<label> names (conf/evaluate.yaml), checked before anything is loaded."""
    if label in RESERVED_LABELS or not label.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"models.{label}: a label is letters, digits, _ and -, and not one of {RESERVED_LABELS}")
    spec = str(spec)
    if spec == "m_old":
        return Target(label, "m_old")
    if spec.startswith("base:"):
        run = Path(spec[len("base:"):]).expanduser()
        adapter = run / "adapter" / "adapter_config.json"
        if not adapter.is_file():
            raise ValueError(f"models.{label}={spec}: {run} holds no adapter (adapter/adapter_config.json), so there "
                             "is no base to find; a run trained without LoRA saved the whole model")
        return Target(label, "base", json.loads(adapter.read_text())["base_model_name_or_path"], run)
    path = Path(spec).expanduser()
    if (path / rundir.RUN_FILE).is_file() or (path / "metrics.json").is_file():
        try:
            return Target(label, "run", str(rundir.model_folder(path)), path)
        except ValueError as exc:
            raise ValueError(f"models.{label}={spec}: {exc}") from exc
    if path.is_dir():
        return Target(label, "folder", str(path))
    if spec.startswith(("/", ".", "~")):
        raise ValueError(f"models.{label}={spec}: no such folder")
    return Target(label, "hub", spec)


def sweep_models(sweep: Path, seed: int, exclude: set[str]) -> dict[str, str]:
    """{method: job folder} for the finished jobs of a trace-realign sweep that ran with `seed`. Jobs of one
    method and seed must be unique (a sweep over other settings too needs `models` instead)."""
    from trace_realign.report.collect import load_jobs, method_of, seed_of

    if not sweep.is_dir():
        raise ValueError(f"models_from={sweep}: no such folder")
    found: dict[str, str] = {}
    jobs = [j for j in load_jobs([sweep]) if seed_of(j) == seed]
    for job in jobs:
        if job.status != "finished":
            raise ValueError(f"models_from={sweep}: the job {job.path} of seed {seed} is {job.status}; finish or "
                             "rerun it, or name the models to compare in `models`")
        method = method_of(job)
        if method in exclude:
            continue
        if method in found:
            raise ValueError(f"models_from={sweep}: two finished jobs of method {method} at seed {seed} ({found[method]}, "
                             f"{job.path}); name the ones to compare in `models` instead")
        found[method] = job.path
    if not found:
        raise ValueError(f"models_from={sweep}: no finished job ran with seed={seed}")
    return found


def sweep_report(sweep: Path) -> dict[str, Any] | None:
    """The `report` block (paper table, rows, columns) of the sweep's experiment, if it has one."""
    from trace_realign.report.collect import load_jobs

    return next((j.report for j in load_jobs([sweep]) if j.report), None)


def check_same_dataset(cfg: DictConfig, targets: list[Target]) -> None:
    """A run's held-out prompts and policies are its dataset's: evaluating it under another dataset
    config would judge it against other policies. Refuse, naming the settings that differ."""
    mine = {k: v for k, v in json.loads(json.dumps(flat_config(cfg), default=str)).items() if k.startswith("dataset.")}
    for t in targets:
        stored = t.run / "run.json" if t.run else None
        if stored is None or not stored.is_file():
            continue
        theirs = {k: v for k, v in json.loads(stored.read_text())["config"].items() if k.startswith("dataset.")}
        diff = rundir.differences(theirs, mine)
        if diff:
            raise ValueError(f"models.{t.label}: {t.run} was trained on another dataset configuration than this "
                             "evaluation's:\n  " + "\n  ".join(diff[:12]) +
                             "\nPass the run's dataset overrides (and seed) to trace-eval as well.")


def held_out_items(cfg: DictConfig, targets: list[Target], source: Any, oracle: Any, out: Path) -> list[dict[str, Any]]:
    """The prompts every model is evaluated on (conf/evaluate.yaml: eval_items)."""
    if cfg.get("eval_items"):
        return load_eval_prompts(cfg.eval_items)
    runs = [t for t in targets if t.run is not None]
    if runs:
        files = {t.label: t.run / "data" / EVAL_FILE for t in runs}
        first = next(iter(files.values()))
        if first.is_file():
            texts = {label: f.read_text() if f.is_file() else None for label, f in files.items()}
            differ = [label for label, text in texts.items() if text != texts[runs[0].label]]
            if differ:
                raise ValueError(f"models {differ}: their runs were evaluated on other held-out prompts than "
                                 f"{runs[0].label}'s ({first}); compare runs of one dataset and seed, or set eval_items")
            return load_eval_prompts(first)
    items = source.eval_prompts()
    if items:
        return items
    # the eval split the data stages cut (PKU-SafeRLHF's test split, say): run them as training would
    _, datamodule = build_datamodule(cfg, source, oracle, None, out)
    datamodule.prepare_data()
    return datamodule.eval_prompts()


def load_target(cfg: DictConfig, target: Target, source: Any) -> tuple[Any, Any, str]:
    """(model, tokenizer, the path it came from) for one target."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    path = target.path
    if target.kind == "m_old":
        corpus = source.corpus() if cfg.model.get("build") else None
        path = resolve_model_path(cfg.model, corpus, cfg.paths.cache_dir)
        if cfg.model.get("prealign"):
            from trace_realign.models.prealign import prealigned_model
            from trace_realign.train import run as train_run  # building M_old runs the training pipeline

            path, _ = prealigned_model(cfg, path, train_run, source)
    if target.run is not None:  # the run's own model settings (dtype, attention) load its weights
        stored = target.run / "config.yaml"
        if stored.is_file():
            model_cfg = {**model_cfg, **OmegaConf.to_container(OmegaConf.load(stored).model, resolve=True)}
    return load_for_eval(path, model_cfg), load_tokenizer(path, model_cfg), path


def run(cfg: DictConfig) -> dict[str, Any]:
    start = time.time()
    out = Path(cfg.paths.output_dir)
    quiet = bool(cfg.get("quiet", False))
    models = dict(cfg.get("models") or {})
    if cfg.get("models_from"):
        models.update(sweep_models(Path(cfg.models_from), cfg.seed, exclude=set(models)))
        report = sweep_report(Path(cfg.models_from))
        if report is not None:  # the evaluation of a table's sweep reports as that table (trace-tables)
            cfg.report = report
    elif not models:
        models = {"m_old": "m_old"}
    targets = [resolve_target(label, spec) for label, spec in models.items()]
    check_same_dataset(cfg, targets)
    if launched_as_rank_zero():
        rundir.claim(out, cfg)
    pin_threads(cfg.get("threads"))
    if launched_as_rank_zero():
        rundir.record_environment(out, eval_device(cfg))
    seed_everything(cfg.seed)
    source = instantiate(cfg.dataset)
    oracle, judge, _ = build_judges(cfg, source)
    items = held_out_items(cfg, targets, source, oracle, out)
    if cfg.eval.max_prompts:
        items = items[: cfg.eval.max_prompts]
    evaluation = build_evaluation(cfg, judge, source.new, source.old, items, out, progress=not quiet,
                                  policies=eval_policies(cfg, source))
    metrics: dict[str, Any] = {"eval/items": float(len(items))}
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    greedy: dict[str, list[str]] = {}
    for target in targets:
        t0 = time.time()
        with framework_quiet(quiet):
            model, tokenizer, path = load_target(cfg, target, source)
        model.to(eval_device(cfg))
        log.info("evaluating %s (%s: %s)", target.label, target.kind, path)
        seed_everything(cfg.seed)  # each model sees the same random stream whatever came before it
        numbers, rows[target.label], other = evaluate_model(evaluation, model, tokenizer, target.label)
        write_eval_rows(out, target.label, other)
        metrics.update(numbers)
        metrics[f"time/eval_{target.label}_seconds"] = time.time() - t0
        greedy[target.label] = [rows[target.label].get(i, {}).get("response") for i in range(len(items))]
        del model
    write_generations(out / "generations.jsonl", items, rows)
    preference = cfg.eval.get("preference") or {}
    if preference.get("enabled"):
        metrics.update(compare(preference, items, greedy, judge, source.new, out))
    if hasattr(judge, "metrics"):
        metrics.update({k.replace("oracle/", "judge/", 1): v for k, v in judge.metrics().items()})
    metrics["time/total_seconds"] = time.time() - start
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    write_metrics(out / "metrics.json", metrics)
    if not quiet:
        print_table(out, [t.label for t in targets], metrics)
    return metrics


def compare(preference: DictConfig, items: list[dict[str, Any]], greedy: dict[str, list[str | None]], judge: Any,
            new: Any, out: Path) -> dict[str, float]:
    """The preference kit (eval/preference.py) on the models' greedy responses to the held-out value prompts
    (eval.preference): a blind kit in out/preference/, filled in by the configured annotator, measured."""
    from trace_realign.eval import preference as kit

    if len(greedy) < 2:
        raise ValueError("eval.preference: comparing needs at least two models (models=...)")
    index = [i for i, it in enumerate(items) if it.get("kind", "value") == "value"]
    if preference.get("max_items"):
        index = index[: int(preference.max_items)]
    chosen = [{"id": str(i), "prompt": items[i]["prompt"]} for i in index]
    responses = {label: [texts[i] or "" for i in index] for label, texts in greedy.items()}
    folder = out / "preference"
    annotator = preference.get("annotator") or "none"
    if annotator == "none":  # a kit for people: they fill it in; `trace-preference import` measures
        kit.export_kit(chosen, responses, folder, int(preference.seed), policy=new)
        log.info("preference: kit for annotators in %s (trace-preference import %s when they are back)", folder, folder)
        return {}
    if annotator == "oracle":
        machine = kit.OraclePanel(judge, k=int(preference.oracle.k), noise=float(preference.oracle.noise),
                                  seed=int(preference.seed))
    elif annotator == "llm":
        machine = kit.LLMAnnotators(**OmegaConf.to_container(preference.llm, resolve=True))
    else:
        raise ValueError(f"eval.preference.annotator: {annotator!r}; expected oracle, llm or none")
    return kit.run_preference(chosen, responses, machine, folder, preference.get("baseline"), policy=new,
                              seed=int(preference.seed), ties=str(preference.ties), interval=str(preference.interval),
                              resamples=int(preference.resamples))


def print_table(out: Path, labels: list[str], metrics: dict[str, Any]) -> None:
    """Each model's headline numbers with their 95 % intervals, one row per model."""
    columns = [("TPA", "tpa"), ("shifted", "tpa/shifted"), ("unchanged", "tpa/unchanged"), ("TPA sampled", "tpa_sampled"),
               ("utility", "utility"), ("ASR", "asr/overall")]
    columns += sorted({(k.split("/")[3], "/".join(k.split("/")[2:])) for k in metrics
                       if k.startswith("eval/") and "/capability/" in k and not k.endswith(("_stderr", "/n"))})
    columns += sorted({(f"ASR {k.split('/')[-1].replace('_', ' ')}", f"asr/{k.split('/')[-1]}") for k in metrics
                       if k.startswith("eval/") and "/asr/" in k and k.count("/") == 3 and not k.endswith(("/n", "/overall"))})
    present = [(name, key) for name, key in columns if any(f"eval/{lb}/{key}" in metrics for lb in labels)]

    def cell(label: str, key: str) -> str:
        v = metrics.get(f"eval/{label}/{key}")
        if v is None:
            return "-"
        head, _, rest = key.partition("/")
        ci = metrics.get(f"eval/{label}/{head}_ci95" + (f"/{rest}" if rest else ""))
        if ci is None:
            ci = metrics.get(f"eval/{label}/{key}_stderr")
            ci = None if ci is None else 1.959963984540054 * ci * (100 if v <= 1 else 1)
            v = 100 * v if key.startswith("capability/") and v <= 1 else v
        return f"{v:.1f} ± {ci:.1f}" if ci is not None else f"{v:.1f}"

    grid = [[name for name, _ in present]] + [[cell(lb, key) for _, key in present] for lb in labels]
    widths = [max(len(row[j]) for row in grid) for j in range(len(present))]
    first = max(len(lb) for lb in labels)
    lines = [f"\ntrace-eval: outputs in {out}"]
    for label, row in zip([""] + labels, grid):
        lines.append("  " + f"{label:<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(row, widths)))
    lines.append("  (± the half-width of the 95 % interval; capability in percent, interval from lm-eval's stderr)")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path="pkg://trace_realign.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_app(run, cfg, "trace-eval")


if __name__ == "__main__":
    main()
