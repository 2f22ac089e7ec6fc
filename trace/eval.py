"""Evaluation: generate on held-out prompts and let the oracle judge them.

TPA (target policy agreement) is the percent of generations that comply with pi_new; `tpa_old` the same
under pi_old. Prompts carrying an `axis`, `category` or `shift` also get TPA per group. Every percentage
comes with the half-width of its 95 % Wilson interval (`*_ci95`, in points), so two runs can be told
apart from noise. A verdict the oracle could not give (a failed call, a prompt it cannot read) is no
verdict: it is left out of the percentage and counted (`*/undecided`).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from trace_realign.oracle import Oracle, Policy
from trace_realign.sequences import encode_prompt

log = logging.getLogger(__name__)

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, as fractions (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def percent_with_ci(verdicts: Sequence[bool]) -> tuple[float, float, float, float]:
    """(percent true, half-width, low, high) of the 95 % Wilson interval, all in points."""
    k, n = sum(verdicts), len(verdicts)
    lo, hi = wilson_interval(k, n)
    return 100.0 * k / max(n, 1), 50.0 * (hi - lo), 100.0 * lo, 100.0 * hi


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of each prompt (through the chat template), left-padded in batches.

    Prompts are generated in order of length so a batch holds little padding; the answers come back in
    the prompts' order.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded_all = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded_all[i]), i))
    out: dict[int, str] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        encoded = [encoded_all[i] for i in idx]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, text in zip(idx, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
            out[i] = text.strip()
    if was_training:
        model.train()
    return [out[i] for i in range(len(prompts))]


GROUP_KEYS = ("axis", "category", "shift")


def agreement(
    oracle: Oracle, policy: Policy, items: Sequence[dict[str, Any]], responses: Sequence[str]
) -> tuple[dict[str, float], list[bool | None]]:
    """Percent compliant overall and per group (an item's axis, category and shift) with the half-width
    of each one's 95 % interval, and the verdicts themselves. Keys are suffixes: "" overall, "/<group>"
    per group, "_ci95..." for the intervals, "/undecided" for the verdicts left out."""
    verdicts = oracle.judge_batch([(it["prompt"], r) for it, r in zip(items, responses)], policy)
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, v in zip(items, verdicts):
        if v is None:
            continue
        groups[""].append(v)
        for key in GROUP_KEYS:
            if it.get(key):
                groups[f"/{it[key]}"].append(v)
    out: dict[str, float] = {}
    for suffix, vs in sorted(groups.items()):
        pct, half, _, _ = percent_with_ci(vs)
        out[suffix], out[f"_ci95{suffix}"] = pct, half
    out["/undecided"] = float(sum(v is None for v in verdicts))
    return out, list(verdicts)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    oracle: Oracle,
    new: Policy,
    old: Policy,
    items: Sequence[dict[str, Any]],
    prefix: str,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics under `prefix` (e.g. eval/after) and one row per item: its response and verdicts.

    Items of kind "value" give tpa (pi_new) and tpa_old (pi_old); items of kind "utility" give utility,
    the percent the oracle judges correct (no policy governs them).
    """
    if not items:
        return {}, []
    responses = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size)
    rows = [{"response": r} for r in responses]
    value = [i for i, it in enumerate(items) if it.get("kind", "value") == "value"]
    utility = [i for i, it in enumerate(items) if it.get("kind") == "utility"]
    metrics = {f"{prefix}/n": float(len(value))}
    failed_before = oracle.failed_calls
    if value:
        v_items, v_resp = [items[i] for i in value], [responses[i] for i in value]
        for name, policy in (("tpa", new), ("tpa_old", old)):
            numbers, verdicts = agreement(oracle, policy, v_items, v_resp)
            metrics.update({f"{prefix}/{name}{suffix}": x for suffix, x in numbers.items()})
            for i, v in zip(value, verdicts):
                rows[i][name] = v
        undecided = metrics[f"{prefix}/tpa/undecided"]
        if undecided:
            log.warning("%s: the judge gave no verdict on %d of %d generations; they are left out of TPA%s",
                        prefix, int(undecided), len(value),
                        "" if undecided < len(value) / 2 else " (a judge that knows only annotated responses, "
                        "oracle=labels, cannot score generations: add one that reads text, oracle@judge=openai)")
        if undecided == len(value):
            raise RuntimeError(f"{prefix}: the judge gave no verdict on any of {len(value)} generations; "
                               "TPA cannot be measured (see the warning above)")
    if utility:
        u_items, u_resp = [items[i] for i in utility], [responses[i] for i in utility]
        numbers, verdicts = agreement(oracle, new, u_items, u_resp)
        metrics[f"{prefix}/utility"], metrics[f"{prefix}/utility_ci95"] = numbers[""], numbers["_ci95"]
        metrics[f"{prefix}/n_utility"] = float(len(utility))
        for i, v in zip(utility, verdicts):
            rows[i]["correct"] = v
    failed = oracle.failed_calls - failed_before
    metrics[f"{prefix}/judge_failed"] = float(failed)
    asked = 2 * len(value) + len(utility)
    if failed > oracle.max_failed_fraction * asked:
        raise RuntimeError(f"{prefix}: {failed} of {asked} judge calls failed (more than oracle.max_failed_fraction="
                           f"{oracle.max_failed_fraction}); the numbers would rest on too few verdicts. A rerun asks "
                           "the failed ones again (answered ones are cached)")
    return metrics, rows


def _ci_key(when: str, key: str) -> str:
    name, _, group = key.partition("/")
    return f"eval/{when}/{name}_ci95" + (f"/{group}" if group else "")


def verdict(metrics: dict[str, Any], tolerance: float = 2.0) -> list[str]:
    """A few lines a newcomer can read: before -> after with 95 % intervals on the shifted and unchanged
    axes (or overall TPA) and utility, and whether realignment happened and what it cost."""
    def cell(when: str, key: str) -> str:
        v = metrics.get(f"eval/{when}/{key}")
        if v is None:
            return "-"
        ci = metrics.get(_ci_key(when, key))
        return f"{v:5.1f} ±{ci:4.1f}" if ci is not None else f"{v:5.1f}"

    shifted = "eval/before/tpa/shifted" in metrics
    rows = ([("TPA, shifted axes", "tpa/shifted"), ("TPA, unchanged axes", "tpa/unchanged")] if shifted
            else [("TPA (pi_new)", "tpa")] + [(f"TPA, {c} prompts", f"tpa/{c}") for c in ("invert", "punish", "retain")
                                             if f"eval/before/tpa/{c}" in metrics])
    rows += [("utility", "utility")]
    rows = [(label, key) for label, key in rows if f"eval/after/{key}" in metrics]
    if not rows:
        return []
    width = max(len(label) for label, _ in rows)
    lines = [f"  {'':<{width}}  {'before':>11}  {'after':>11}  change"]
    for label, key in rows:
        b, a = metrics.get(f"eval/before/{key}"), metrics[f"eval/after/{key}"]
        change = "" if b is None else f"{a - b:+.1f}"
        lines.append(f"  {label:<{width}}  {cell('before', key):>11}  {cell('after', key):>11}  {change}")

    target = "tpa/shifted" if shifted else "tpa"
    b, a = metrics.get(f"eval/before/{target}"), metrics.get(f"eval/after/{target}")
    if b is None or a is None:
        return lines
    b_hi = b + metrics.get(_ci_key("before", target), 0.0)
    a_lo = a - metrics.get(_ci_key("after", target), 0.0)
    where = "on the shifted axes" if shifted else "overall"
    if a_lo > b_hi:
        said = f"realigned: TPA {where} rose from {b:.1f} to {a:.1f} (the 95 % intervals do not overlap)"
    elif a > b:
        said = f"not shown to realign: TPA {where} rose from {b:.1f} to {a:.1f}, within the noise of the 95 % intervals"
    else:
        said = f"not realigned: TPA {where} went from {b:.1f} to {a:.1f}"
    costs = []
    for label, key in (("unchanged axes", "tpa/unchanged"), ("utility", "utility")):
        before, after = metrics.get(f"eval/before/{key}"), metrics.get(f"eval/after/{key}")
        if before is not None and after is not None:
            costs.append(f"{label} kept ({after - before:+.1f})" if after >= before - tolerance
                         else f"{label} fell by {before - after:.1f} points")
    lines.append("  verdict: " + said + ("; " + ", ".join(costs) if costs else ""))
    return lines
