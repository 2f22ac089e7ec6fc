"""General capability through lm-evaluation-harness (lm-eval), on the model in memory.

lm-eval does the scoring (each task's prompts, few-shot examples, filters and metrics, as its YAMLs define
them); this evaluator hands it the model and turns its results into flat keys, for each task, group or
tag's task named in `tasks`:

    capability/<task>/<metric>          lm-eval's "<metric>,<filter>", the filter dropped when it is "none":
                                        acc,none -> acc; exact_match,strict-match -> exact_match_strict-match
    capability/<task>/<metric>_stderr   its standard error: acc_stderr,none -> acc_stderr;
                                        exact_match_stderr,strict-match -> exact_match_strict-match_stderr
    capability/<task>/n                 the samples evaluated (a group: over all of its tasks)

A group's subtasks and everything else lm-eval reports are in <work_dir>/capability/*.json.

`items_task` turns the held-out items of kind "utility" that carry an `answer` (the embedded world's sums)
into a local lm-eval task (`trace_utility`), so that one code path measures capability on the embedded
world and on the paper's benchmarks. Its prompt is the text eval.generation.generate sends (the chat
template with the generation prompt when the tokenizer has one), generation is greedy for
eval.max_new_tokens tokens and stops at EOS; the first integer of the response must equal the answer
(exact_match). Its filter is named "none" so that its key reads capability/trace_utility/exact_match.
`limit`, `num_fewshot`, `apply_chat_template` and `max_gen_toks` apply to `tasks`; the items task takes
every answered item, zero-shot, in a run of its own.

The model is evaluated as it is: a PeftModel goes to lm-eval's HFLM unmerged, whose forward and generate
run through the active adapter, so nothing is merged or copied. lm-eval puts the model in eval mode and
seeds python's, numpy's and torch's generators; every module's mode and those generators' states are put
back afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml

from trace_realign.eval.base import EvalInputs, EvalResult, Evaluator

log = logging.getLogger(__name__)

ITEMS_TASK = "trace_utility"
FIRST_INTEGER = r"(-?\d+)"  # what a sum's answer is read as
INSTALL = "pip install lm-eval"


def import_lm_eval() -> Any:
    """lm_eval, imported only when a capability evaluator runs, so the package never needs it otherwise."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (the model wrapper used below)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"eval.evaluators.capability runs lm-evaluation-harness, which is not installed: "
                          f"{INSTALL} (or switch it off: eval.evaluators.capability=null)") from exc
    return lm_eval


def metric_key(raw: str) -> str | None:
    """lm-eval's result key "<metric>,<filter>" as ours (module docstring); None for keys that are no metric
    (name, alias, sample_len)."""
    name, sep, filt = raw.partition(",")
    if not sep:
        return None
    stderr = name.endswith("_stderr")
    base = name[: -len("_stderr")] if stderr else name
    key = base if filt == "none" else f"{base}_{filt}"
    return f"{key}_stderr" if stderr else key


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Flat keys <task>/<metric> for each top-level task or group of lm-eval's results (a group's subtasks
    are left to its results file)."""
    nested = {t for subtasks in (results.get("group_subtasks") or {}).values() for t in subtasks}
    out: dict[str, float] = {}
    for task, row in results["results"].items():
        if task in nested:
            continue
        for raw, value in row.items():
            key = metric_key(raw)
            # "N/A" where lm-eval has no standard error
            if key is not None and isinstance(value, numbers.Real) and not isinstance(value, bool):
                out[f"{task}/{key}"] = float(value)
        out[f"{task}/n"] = float(row["sample_len"])
    return out


def items_task_config(name: str, data: Path, cache: Path, max_gen_toks: int) -> dict[str, Any]:
    """The lm-eval task of the held-out sums: the prompt as it is, greedy up to EOS, first integer vs answer."""
    return {
        "task": name,
        "dataset_path": "json",
        # its own datasets cache, beside the data, so a rewritten file is never read from a stale one
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        # no stop string of its own: lm-eval adds the EOS token's text
        "generation_kwargs": {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": "none", "filter": [
            {"function": "regex", "regex_pattern": FIRST_INTEGER, "group_select": 0, "fallback": "[invalid]"},
            {"function": "take_first"},
        ]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def answered_utility_items(items: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the utility items that carry an answer; the others cannot be scored by exact match."""
    index = [i for i, it in enumerate(items) if it.get("kind") == "utility"]
    answered = [i for i in index if answer_of(items[i])]
    if len(answered) < len(index):
        log.warning("capability: %d of %d utility items carry no `answer` and are left out of %s",
                    len(index) - len(answered), len(index), ITEMS_TASK)
    return answered


def answer_of(item: dict[str, Any]) -> str:
    return str(item.get("answer") or "").strip()


def write_items_task(name: str, items: Sequence[dict[str, Any]], index: Sequence[int], folder: Path,
                     max_gen_toks: int) -> Path:
    """The items as JSON lines (with their index in EvalInputs.items) and the task YAML, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in index:
            fh.write(json.dumps({"index": i, "prompt": items[i]["prompt"], "answer": answer_of(items[i])}) + "\n")
    config = items_task_config(name, data, folder / "datasets_cache", max_gen_toks)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


@contextlib.contextmanager
def kept_state(model: torch.nn.Module) -> Iterator[None]:
    """Put back every module's train/eval mode and the random generators lm-eval seeds, so that evaluating
    before training changes nothing training then draws."""
    modes = [(m, m.training) for m in model.modules()]
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def quiet_lm_eval(log: Path) -> Iterator[None]:
    """lm-eval logs each task's setup at INFO and warns that a model object ignores its loading arguments
    (expected here); datasets draws a bar per file it reads. Warnings that matter still show. What lm-eval
    prints itself (its request bars, git's "not a git repository" when it records a commit) goes to `log`."""
    import datasets

    from trace_realign.core.logs import stderr_to

    levels = {"lm_eval": logging.WARNING, "lm_eval.models.huggingface": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in levels}
    bars = datasets.utils.logging.is_progress_bar_enabled()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.disable_progress_bar()
    try:
        with stderr_to(log):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def folder_for(work_dir: Path | None) -> Iterator[Path]:
    """<work_dir>/capability, or a temporary folder when the caller gave none."""
    if work_dir is not None:
        path = Path(work_dir) / "capability"
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="capability.") as tmp:
        yield Path(tmp)


class Capability(Evaluator):
    """lm-eval's tasks (and the held-out sums as one) on the model under evaluation."""

    name = "capability"

    def __init__(
        self,
        tasks: Sequence[str] = (),
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int | str = 16,
        apply_chat_template: bool = False,
        include_path: Sequence[str] = (),
        max_gen_toks: int | None = None,
        items_task: bool | str = False,
    ):
        self.tasks = list(tasks or [])
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.apply_chat_template = bool(apply_chat_template)
        self.include_path = [str(p) for p in (include_path or [])]
        self.max_gen_toks = max_gen_toks
        self.items_task = ITEMS_TASK if items_task is True else (items_task or None)

    def needs_text_judge(self) -> bool:
        return False  # lm-eval scores; the judge is never asked

    def __call__(self, inputs: EvalInputs) -> EvalResult:
        lm_eval = import_lm_eval()
        result = EvalResult()
        index = answered_utility_items(inputs.items) if self.items_task else []
        if not self.tasks and not index:
            return result
        with folder_for(inputs.work_dir) as folder, kept_state(inputs.model), quiet_lm_eval(folder / "lm_eval.log"):
            paths = list(self.include_path)
            if index:
                paths.append(str(write_items_task(self.items_task, inputs.items, index, folder / "tasks",
                                                  inputs.generation.max_new_tokens)))
            manager = self._task_manager(paths)
            lm = self._lm(inputs)
            if self.tasks:
                results = self._evaluate(lm_eval, lm, manager, self.tasks, limit=self.limit,
                                         num_fewshot=self.num_fewshot, apply_chat_template=self.apply_chat_template,
                                         gen_kwargs={"max_gen_toks": self.max_gen_toks} if self.max_gen_toks else None)
                self._keep(results, folder / "tasks.json", result)
            if index:
                # the chat template exactly when our own generate uses it (sequences.prompt_text)
                results = self._evaluate(lm_eval, lm, manager, [self.items_task], log_samples=True,
                                         apply_chat_template=bool(getattr(inputs.tokenizer, "chat_template", None)))
                self._keep(results, folder / f"{self.items_task}.json", result)
                result.item_rows.update(item_rows(results["samples"][self.items_task]))
        return result

    def _task_manager(self, paths: list[str]) -> Any:
        """The user's and the items' task folders; lm-eval's own tasks only when a name needs them (indexing
        its thousands of YAMLs takes seconds)."""
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=paths or None, include_defaults=False)
        if any(t not in manager.all_tasks for t in self.tasks):
            manager = TaskManager(include_path=paths or None)
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"eval.evaluators.capability.tasks: lm-eval knows no task {unknown} (neither its own nor "
                             f"one in include_path={self.include_path}); `lm-eval ls tasks` lists its tasks")
        return manager

    def _lm(self, inputs: EvalInputs) -> Any:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=inputs.model, tokenizer=inputs.tokenizer, backend="causal", batch_size=self.batch_size)

    @staticmethod
    def _evaluate(lm_eval: Any, lm: Any, manager: Any, tasks: list[str], log_samples: bool = False,
                  **settings: Any) -> dict[str, Any]:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=log_samples,
                                       **settings)

    @staticmethod
    def _keep(results: dict[str, Any], path: Path, result: EvalResult) -> None:
        """Its metrics into `result`, and lm-eval's whole report (less the samples) to `path`."""
        result.metrics.update({f"capability/{k}": v for k, v in task_metrics(results).items()})
        report = {k: v for k, v in results.items() if k != "samples"}
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def item_rows(samples: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """What lm-eval generated for each held-out item, what it read from it and whether that was right."""
    return {int(s["doc"]["index"]): {"capability": {"response": s["resps"][0][0], "read": s["filtered_resps"][0],
                                                    "correct": bool(s["exact_match"])}} for s in samples}
