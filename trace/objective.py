"""The hybrid TRACE objective (Algorithm 1, lines 24-28), shared by training and impact scoring.

Batches of the two conflict categories stack their two responses: rows [0, b) hold the first response
and rows [b, 2b) the second, where
    invert:            first = y_l (now preferred), second = y_w            -> relational loss
    punish (NPO):      first = y_w,                 second = y_l            -> NPO on both
    punish (oracle):   first = y_c (correction),    second = y_w            -> relational loss
Retain batches hold y_w alone and feed the KL anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trace_realign.losses import RELATIONAL_LOSSES, kl_anchor, npo_loss, relational_loss
from trace_realign.model import reference_of
from trace_realign.records import INVERT, PUNISH
from trace_realign.sequences import sequence_logps, shift_for_loss

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class ObjectiveConfig:
    """beta, the relational loss, alpha_KL and how batch sums are reduced.

    reduction="sum" is Algorithm 1 as written: L = sum_i w_i l_i + ... with w summing to 1 over the
    conflict set. reduction="mean" uses w * |D_conflict| (mean 1) and batch means, so uniform weights give
    plain batch-mean losses and alpha_KL keeps its meaning whatever the data size.
    """

    beta: float = 0.1
    relational: str = "sigmoid"
    alpha_kl: float = 0.1
    reduction: str = "mean"
    oracle_punish: bool = False

    def __post_init__(self) -> None:
        if self.relational not in RELATIONAL_LOSSES:
            raise ValueError(f"loss.type: unknown relational loss {self.relational!r}; expected one of {RELATIONAL_LOSSES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"objective.reduction: {self.reduction!r}; expected one of {REDUCTIONS}")
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be positive, got {self.beta}")
        if self.alpha_kl < 0:
            raise ValueError(f"objective.alpha_kl must be >= 0, got {self.alpha_kl}")


def conflict_losses(
    category: str, policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig
) -> torch.Tensor:
    """Per-sample loss of a stacked conflict batch (see the module docstring for the row layout)."""
    b = policy_logps.shape[0] // 2
    p1, p2, r1, r2 = policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:]
    if category == INVERT or (category == PUNISH and cfg.oracle_punish):
        return relational_loss(p1, p2, r1, r2, cfg.beta, cfg.relational)  # lines 24 and 25
    if category == PUNISH:
        return npo_loss(p1, p2, r1, r2, cfg.beta)  # line 26
    raise ValueError(f"no conflict loss for category {category!r}")


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def policy_and_reference_logps(
    policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta(y|x) with gradient and log pi_ref(y|x) without, one per row."""
    with torch.no_grad(), reference_of(policy, reference) as ref:
        ref_logps = sequence_logps(forward_logits(ref, batch), batch["labels"])
    pol_logps = sequence_logps(forward_logits(policy, batch), batch["labels"])
    return pol_logps, ref_logps


def retain_kl(policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per retained sequence, summed over its response tokens (line 27)."""
    with torch.no_grad(), reference_of(policy, reference) as ref:
        ref_logits = forward_logits(ref, batch)
    pol_logits = forward_logits(policy, batch)
    ref_logits, _, mask = shift_for_loss(ref_logits, batch["labels"])
    pol_logits = pol_logits[:, :-1, :]
    return kl_anchor(ref_logits, pol_logits, mask.to(pol_logits.dtype))


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values.sum()
