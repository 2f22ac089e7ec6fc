"""Target policy agreement and utility, judged on the model's own generations.

TPA is the percent of generations on held-out prompts that comply with pi_new; `tpa_old` the same under
pi_old. Prompts carrying an `axis`, `category` or `shift` also get TPA per group. Every percentage comes
with the half-width of its 95 % Wilson interval (`*_ci95`, in points). With eval.generation.samples > 0
the same is measured on sampled responses (`tpa_sampled`), each prompt's share of compliant samples
averaged over prompts, its interval taken over prompts (never narrower than
the Wilson interval of the prompts alone). A verdict the judge could not give is no verdict:
it is left out of the percentage and counted (`*/undecided`).

Utility is the percent of utility items (kind "utility", e.g. the embedded world's sums) the judge finds
answered correctly; no policy governs them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

from trace_realign.eval.base import EvalInputs, EvalResult, Evaluator
from trace_realign.eval.stats import mean_with_ci, percent_with_ci, wilson_interval
from trace_realign.oracle.base import Oracle, Policy

log = logging.getLogger(__name__)

GROUP_KEYS = ("axis", "category", "shift")


def group_suffixes(item: dict[str, Any]) -> list[str]:
    """"" (overall) and "/<group>" for each of the item's axis, category and shift."""
    return [""] + [f"/{item[key]}" for key in GROUP_KEYS if item.get(key)]


def summarize(items: Sequence[dict[str, Any]], verdicts: Sequence[bool | None]) -> dict[str, float]:
    """Percent compliant overall and per group with the half-width of each one's 95 % interval. Keys are
    suffixes: "" overall, "/<group>" per group, "_ci95..." for the intervals, "/undecided" for the
    verdicts left out."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, v in zip(items, verdicts):
        if v is None:
            continue
        for suffix in group_suffixes(it):
            groups[suffix].append(v)
    out: dict[str, float] = {}
    for suffix, vs in sorted(groups.items()):
        pct, half, _, _ = percent_with_ci(vs)
        out[suffix], out[f"_ci95{suffix}"] = pct, half
    out["/undecided"] = float(sum(v is None for v in verdicts))
    return out


def agreement(
    oracle: Oracle, policy: Policy, items: Sequence[dict[str, Any]], responses: Sequence[str]
) -> tuple[dict[str, float], list[bool | None]]:
    """summarize() of the oracle's verdicts on (item prompt, response), and the verdicts themselves."""
    verdicts = oracle.judge_batch([(it["prompt"], r) for it, r in zip(items, responses)], policy)
    return summarize(items, verdicts), list(verdicts)


def summarize_sampled(items: Sequence[dict[str, Any]], verdicts: Sequence[Sequence[bool | None]]) -> dict[str, float]:
    """Sampled TPA: each prompt's percent of compliant samples (undecided ones left out), averaged over the
    prompts of each group, with the 95 % interval over prompts."""
    groups: dict[str, list[float]] = defaultdict(list)
    undecided = 0
    for it, vs in zip(items, verdicts):
        decided = [v for v in vs if v is not None]
        undecided += len(vs) - len(decided)
        if not decided:
            continue
        share = 100.0 * sum(decided) / len(decided)
        for suffix in group_suffixes(it):
            groups[suffix].append(share)
    out: dict[str, float] = {}
    for suffix, shares in sorted(groups.items()):
        mean, half = mean_with_ci(shares)
        # At 0 or 100 % the normal interval has no width; the Wilson interval of the prompts alone (each
        # counted once, at the mean share) keeps an honest one there. The wider of the two is reported.
        lo, hi = wilson_interval(round(mean / 100 * len(shares)), len(shares))
        out[suffix], out[f"_ci95{suffix}"] = mean, max(half, 50.0 * (hi - lo))
    out["/undecided"] = float(undecided)
    return out


def value_items(items: Sequence[dict[str, Any]]) -> list[int]:
    return [i for i, it in enumerate(items) if it.get("kind", "value") == "value"]


def answered(inputs: EvalInputs, index: list[int]) -> tuple[list[int], list[dict[str, Any]], list[str], list[str]]:
    """The items at `index`, their prompts and the model's greedy responses to them."""
    items = [inputs.items[i] for i in index]
    prompts = [it["prompt"] for it in items]
    return index, items, prompts, inputs.greedy(prompts) if prompts else []


class TPA(Evaluator):
    """tpa (pi_new) and tpa_old (pi_old) on the held-out value prompts, and agree_<label> for each further
    policy of eval.policies, judged on the same greedy responses; sampled as well when asked."""

    name = "tpa"

    def __init__(self, old_policy: bool = True, sampled: bool = True):
        self.old_policy, self.sampled = old_policy, sampled

    def __call__(self, inputs: EvalInputs) -> EvalResult:
        index, items, prompts, responses = answered(inputs, value_items(inputs.items))
        result = EvalResult()
        if not index:
            return result
        result.metrics["n"] = float(len(items))
        policies = [("tpa", inputs.new)] + ([("tpa_old", inputs.old)] if self.old_policy else [])
        policies += [(f"agree_{label}", policy) for label, policy in inputs.policies.items()]
        for name, policy in policies:
            verdicts = inputs.judge_batch(list(zip(prompts, responses)), policy, name)
            result.metrics.update({f"{name}{s}": x for s, x in summarize(items, verdicts).items()})
            for i, r, v in zip(index, responses, verdicts):
                result.item_rows.setdefault(i, {"response": r})[name] = v
        self._check_undecided(inputs, result.metrics["tpa/undecided"], len(items))
        if self.sampled and inputs.generation.samples:
            samples = inputs.sampled(prompts)
            flat = [(p, s) for p, ss in zip(prompts, samples) for s in ss]
            flat_verdicts = inputs.judge_batch(flat, inputs.new, "tpa_sampled")
            n = inputs.generation.samples
            per_item = [flat_verdicts[j * n : (j + 1) * n] for j in range(len(items))]
            result.metrics.update({f"tpa_sampled{s}": x for s, x in summarize_sampled(items, per_item).items()})
            result.metrics["tpa_sampled/samples"] = float(n)
            result.metrics["tpa_sampled/temperature"] = float(inputs.generation.temperature)
            for i, ss, vs in zip(index, samples, per_item):
                result.item_rows[i]["samples"] = [{"response": s, "tpa": v} for s, v in zip(ss, vs)]
        return result

    @staticmethod
    def _check_undecided(inputs: EvalInputs, undecided: float, n: int) -> None:
        if not undecided:
            return
        log.warning("eval/%s: the judge gave no verdict on %d of %d generations; they are left out of TPA%s",
                    inputs.when, int(undecided), n,
                    "" if undecided < n / 2 else " (a judge that knows only annotated responses, oracle=labels, "
                    "cannot score generations: add one that reads text, oracle@judge=openai)")
        if undecided == n:
            raise RuntimeError(f"eval/{inputs.when}: the judge gave no verdict on any of {n} generations; TPA "
                               "cannot be measured (see the warning above)")


class Utility(Evaluator):
    """The percent of utility items (kind "utility") the judge finds answered correctly."""

    name = "utility"

    def __call__(self, inputs: EvalInputs) -> EvalResult:
        index, items, prompts, responses = answered(
            inputs, [i for i, it in enumerate(inputs.items) if it.get("kind") == "utility"])
        result = EvalResult()
        if not index:
            return result
        verdicts = inputs.judge_batch(list(zip(prompts, responses)), inputs.new, "utility")
        pct, half, _, _ = percent_with_ci([v for v in verdicts if v is not None])
        result.metrics.update({"utility": pct, "utility_ci95": half, "n_utility": float(len(items)),
                               "utility/undecided": float(sum(v is None for v in verdicts))})
        for i, r, v in zip(index, responses, verdicts):
            result.item_rows[i] = {"response": r, "correct": v}
        return result
