"""Where a model's probability mass sits: log pi(group | x) for groups of responses (a stance, say) on held-out
prompts, the entropy of the response's first token, and a callback that follows both through training.

Preference losses raise a margin, not a likelihood: pushing the old winner down can send its mass to its
siblings (another refusal) or to junk rather than to the new winner (likelihood displacement; Razin et
al., 2025; the squeezing effect of Ren & Sutherland, 2025). Greedy evaluation shows only the mode; these
numbers show where the rest went. A data source offers the groups with `probe_responses(prompt)` (the
embedded world: every rendering of each stance for the prompt's filler).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch

from trace_realign.core.sequences import SequenceLimits, encode_pair, encode_prompt, pad_batch, sequence_logps

log = logging.getLogger(__name__)


@torch.no_grad()
def group_logps(model: torch.nn.Module, tokenizer: Any, prompt: str, groups: Mapping[str, Sequence[str]],
                limits: SequenceLimits) -> dict[str, float]:
    """log pi(group | prompt) per group: the log of the summed probability of its responses (each ending
    with the turn end, as the model must write it)."""
    device = next(model.parameters()).device
    names = [g for g in groups if groups[g]]
    rows = [encode_pair(tokenizer, prompt, r, limits)[:2] for g in names for r in groups[g]]
    batch = {k: v.to(device) for k, v in pad_batch(rows, tokenizer.pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp = sequence_logps(logits, batch["labels"]).float().cpu()
    out, start = {}, 0
    for g in names:
        n = len(groups[g])
        out[g] = float(torch.logsumexp(lp[start:start + n], 0))
        start += n
    return out


@torch.no_grad()
def first_token_entropy(model: torch.nn.Module, tokenizer: Any, prompt: str) -> float:
    """The entropy (nats) of the model's first response token: near 0 when one opening is all it says."""
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
    logp = model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1)
    return float(-(logp.exp() * logp).sum())


def probe(model: torch.nn.Module, tokenizer: Any, items: Sequence[Mapping[str, Any]], limits: SequenceLimits,
          ) -> dict[str, float]:
    """Means over prompts, per prompt group (`axis`): `logp/<axis>/<group>` and `entropy_first/<axis>`.
    Each item holds a prompt, its `axis` and its `groups` (name -> responses)."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    try:
        for item in items:
            axis = item.get("axis", "all")
            for g, v in group_logps(model, tokenizer, item["prompt"], item["groups"], limits).items():
                sums.setdefault(f"logp/{axis}/{g}", []).append(v)
            sums.setdefault(f"entropy_first/{axis}", []).append(first_token_entropy(model, tokenizer, item["prompt"]))
    finally:
        model.train(was_training)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def probe_items(source: Any, prompts: Sequence[Mapping[str, Any]], per_group: int) -> list[dict[str, Any]]:
    """`per_group` held-out prompts of each axis, with the source's response groups for each."""
    if not hasattr(source, "probe_responses"):
        raise ValueError(f"probe.enabled: the dataset ({type(source).__name__}) offers no response groups to probe "
                         "(probe_responses); the embedded world does (dataset=embedded)")
    taken: dict[str, int] = {}
    items = []
    for p in prompts:
        axis = p.get("axis", "all")
        if p.get("kind", "value") != "value" or taken.get(axis, 0) >= per_group:
            continue
        groups = source.probe_responses(p["prompt"])
        if groups:
            taken[axis] = taken.get(axis, 0) + 1
            items.append({"prompt": p["prompt"], "axis": axis, "groups": groups})
    return items


class LikelihoodProbe(L.Callback):
    """Every `every_n_steps` optimizer steps (and before the first), logs `probe/logp/<axis>/<group>` and
    `probe/entropy_first/<axis>` on fixed held-out prompts (rank 0; the probe reads, never trains)."""

    def __init__(self, items: list[dict[str, Any]], tokenizer: Any, limits: SequenceLimits, every_n_steps: int = 25):
        if every_n_steps < 1:
            raise ValueError(f"probe.every_n_steps must be >= 1, got {every_n_steps}")
        self.items, self.tokenizer, self.limits, self.every = items, tokenizer, limits, every_n_steps
        self.history: list[tuple[int, dict[str, float]]] = []

    def _measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        values = probe(module.policy, self.tokenizer, self.items, self.limits)
        step = trainer.global_step
        self.history.append((step, values))
        for logger in trainer.loggers:
            logger.log_metrics({f"probe/{k}": v for k, v in values.items()}, step=step)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.history:
            self._measure(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0 and (not self.history or self.history[-1][0] != trainer.global_step):
            self._measure(trainer, module)

    def metrics(self) -> dict[str, float]:
        """The first and last measurements, for metrics.json."""
        if not self.history:
            return {}
        (_, first), (_, last) = self.history[0], self.history[-1]
        return {**{f"probe/start/{k}": v for k, v in first.items()}, **{f"probe/end/{k}": v for k, v in last.items()}}
