"""One interface for every evaluator, and what they share: the model's generations and a judge that counts.

An evaluator takes an `EvalInputs` (model, tokenizer, judge, policies, held-out items, generation settings)
and returns an `EvalResult`: flat metric keys relative to `eval/<when>/` (`tpa/shifted`, `asr/overall`,
`capability/mmlu/acc`), and optionally per-item rows. `run_evaluators` runs the configured ones in
order and prefixes their keys, so `trace-realign` (before and after training) and `trace-eval` (any
model) write the same keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from trace_realign.eval.generation import GenerationSettings, generate
from trace_realign.oracle.base import Oracle, Policy

log = logging.getLogger(__name__)


class JudgeFailed(RuntimeError):
    """Too many judge calls failed for a number to rest on: the run stops instead of reporting it."""


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    # per held-out item (by its index in EvalInputs.items): what generations.jsonl shows for it
    item_rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    # other records (attacked prompts, say), written to <name>.jsonl beside metrics.json
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalInputs:
    """What every evaluator sees. Generations are made once per prompt and shared between evaluators."""

    model: torch.nn.Module
    tokenizer: Any
    judge: Oracle
    new: Policy
    old: Policy
    items: list[dict[str, Any]]
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    work_dir: Path | None = None  # where an evaluator may write files (lm-eval's local tasks, say)
    when: str = "after"
    progress: bool = True
    # further policies, by label, whose agreement the TPA evaluator also reports (eval.policies)
    policies: dict[str, Policy] = field(default_factory=dict)
    _greedy: dict[str, str] = field(default_factory=dict, repr=False)
    _sampled: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def greedy(self, prompts: Sequence[str]) -> list[str]:
        """The greedy response to each prompt (generated once, then reused)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._greedy))
        if missing:
            g = self.generation
            texts = generate(self.model, self.tokenizer, missing, g.max_new_tokens, g.batch_size, self.progress)
            self._greedy.update(zip(missing, texts))
        return [self._greedy[p] for p in prompts]

    def sampled(self, prompts: Sequence[str]) -> list[list[str]]:
        """generation.samples sampled responses to each prompt (generated once, then reused)."""
        g = self.generation
        missing = list(dict.fromkeys(p for p in prompts if p not in self._sampled))
        if missing:
            texts = generate(self.model, self.tokenizer, missing, g.max_new_tokens, g.batch_size, self.progress,
                             samples=g.samples, temperature=g.temperature, top_p=g.top_p, seed=g.seed)
            self._sampled.update(zip(missing, texts))
        return [self._sampled[p] for p in prompts]

    def judge_batch(self, pairs: Sequence[tuple[str, str]], policy: Policy, what: str) -> list[bool | None]:
        """The judge's verdicts; stops with JudgeFailed when more calls failed than the judge allows
        (oracle.max_failed_fraction), since the number would rest on too few verdicts."""
        before = self.judge.failed_calls
        verdicts = list(self.judge.judge_batch(list(pairs), policy))
        failed = self.judge.failed_calls - before
        if failed > self.judge.max_failed_fraction * max(len(pairs), 1):
            raise JudgeFailed(
                f"eval/{self.when}/{what}: {failed} of {len(pairs)} judge calls failed (more than "
                f"oracle.max_failed_fraction={self.judge.max_failed_fraction}); the numbers would rest on too few "
                "verdicts. A rerun asks the failed ones again (answered ones are cached)")
        return verdicts


class Evaluator:
    """Base class: `name` prefixes its keys; `__call__` measures one model."""

    name: str = ""

    def __call__(self, inputs: EvalInputs) -> EvalResult:
        raise NotImplementedError

    def needs_text_judge(self) -> bool:
        """Whether the judge must read the model's own text (a dataset's labels cannot)."""
        return True


def run_evaluators(
    evaluators: Mapping[str, Evaluator], inputs: EvalInputs
) -> tuple[dict[str, float], dict[int, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Run each evaluator on one model: (metrics under eval/<when>/, rows per item, other rows by evaluator)."""
    metrics: dict[str, float] = {}
    item_rows: dict[int, dict[str, Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    failed_before = inputs.judge.failed_calls
    for name, evaluator in evaluators.items():
        result = evaluator(inputs)
        metrics.update({f"eval/{inputs.when}/{k}": float(v) for k, v in result.metrics.items()})
        for i, row in result.item_rows.items():
            item_rows.setdefault(i, {}).update(row)
        if result.rows:
            rows[name] = result.rows
    metrics[f"eval/{inputs.when}/judge_failed"] = float(inputs.judge.failed_calls - failed_before)
    return metrics, item_rows, rows
