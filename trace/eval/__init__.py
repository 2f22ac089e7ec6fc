"""Evaluation: every measurement is an evaluator with one interface (base.py), configured in the `eval`
group and run the same way by `trace-realign` (before and after training) and `trace-eval` (any model).

    tpa         target policy agreement on held-out prompts, greedy and sampled (tpa.py)
    utility     the data source's own utility items, judged (tpa.py)
    capability  general capability through lm-evaluation-harness (capability.py)
    asr         attack success rate under prompt attacks kept as data (asr.py)
    preference  blind comparisons of several models by people or LLM annotators (preference.py)
"""

from __future__ import annotations

from typing import Any, Mapping

from trace_realign.eval.base import EvalInputs, EvalResult, Evaluator, JudgeFailed, run_evaluators
from trace_realign.eval.capability import Capability  # imports lm-eval only when it runs
from trace_realign.eval.generation import GenerationSettings, generate
from trace_realign.eval.report import verdict
from trace_realign.eval.stats import mean_with_ci, percent_with_ci, wilson_interval
from trace_realign.eval.tpa import TPA, Utility, agreement

__all__ = [
    "Capability", "EvalInputs", "EvalResult", "Evaluator", "GenerationSettings", "JudgeFailed", "TPA", "Utility", "agreement",
    "build_evaluators", "generate", "mean_with_ci", "percent_with_ci", "run_evaluators", "verdict",
    "wilson_interval",
]


def build_evaluators(configs: Mapping[str, Any] | None) -> dict[str, Evaluator]:
    """The evaluators named in eval.evaluators, in order; an entry set to null is switched off."""
    from hydra.utils import instantiate

    out: dict[str, Evaluator] = {}
    for name, cfg in (configs or {}).items():
        if cfg is None:
            continue
        evaluator = instantiate(cfg, _convert_="all")
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"eval.evaluators.{name}: {cfg.get('_target_')} is not an Evaluator "
                            "(trace_realign.eval.base.Evaluator)")
        out[name] = evaluator
    return out
