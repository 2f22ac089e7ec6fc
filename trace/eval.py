"""Evaluation: generate on held-out prompts and let the oracle judge them.

TPA (target policy agreement) is the percent of generations that comply with pi_new; `tpa_old` the same
under pi_old. Prompts carrying an `axis` also get per-axis TPA. A verdict the oracle cannot give counts as
non-compliant and is itself counted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from trace_realign.oracle import Oracle, Policy
from trace_realign.sequences import encode_prompt

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of each prompt (through the chat template), left-padded in batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
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
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    if was_training:
        model.train()
    return [t.strip() for t in out]


GROUP_KEYS = ("axis", "category", "shift")


def agreement(
    oracle: Oracle, policy: Policy, items: Sequence[dict[str, Any]], responses: Sequence[str]
) -> dict[str, float]:
    """Percent compliant overall and per group (an item's axis, category and shift), plus the count of
    undecided verdicts. Keys are suffixes: "" for overall, "/<group>" per group."""
    verdicts = oracle.judge_batch([(it["prompt"], r) for it, r in zip(items, responses)], policy)
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, v in zip(items, verdicts):
        groups[""].append(v is True)
        for key in GROUP_KEYS:
            if it.get(key):
                groups[f"/{it[key]}"].append(v is True)
    out = {suffix: 100.0 * sum(vs) / len(vs) for suffix, vs in sorted(groups.items())}
    out["/undecided"] = float(sum(v is None for v in verdicts))
    return out


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
    """Metrics under `prefix` (e.g. eval/after) and the judged generations themselves.

    Items of kind "value" give tpa (pi_new) and tpa_old (pi_old); items of kind "utility" give utility,
    the percent the oracle judges correct (no policy governs them).
    """
    if not items:
        return {}, []
    responses = generate(model, tokenizer, [it["prompt"] for it in items], max_new_tokens, batch_size)
    value = [(it, r) for it, r in zip(items, responses) if it.get("kind", "value") == "value"]
    utility = [(it, r) for it, r in zip(items, responses) if it.get("kind") == "utility"]
    metrics = {f"{prefix}/n": float(len(value))}
    if value:
        v_items, v_resp = zip(*value)
        for name, policy in (("tpa", new), ("tpa_old", old)):
            for suffix, number in agreement(oracle, policy, v_items, v_resp).items():
                metrics[f"{prefix}/{name}{suffix}"] = number
        undecided = metrics[f"{prefix}/tpa/undecided"]
        if undecided >= len(value) / 2:
            log.warning("%s: the oracle could not judge %d of %d generations and TPA counts them as non-compliant; "
                        "an oracle that knows only annotated responses (oracle=labels) cannot score generations: "
                        "add a judge that reads text (oracle@judge=openai)", prefix, int(undecided), len(value))
    if utility:
        u_items, u_resp = zip(*utility)
        metrics[f"{prefix}/utility"] = agreement(oracle, new, u_items, u_resp)[""]
        metrics[f"{prefix}/n_utility"] = float(len(utility))
    rows = [{**it, "response": r} for it, r in zip(items, responses)]
    return metrics, rows
