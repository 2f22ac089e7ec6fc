"""The hybrid TRACE objective (Algorithm 1, lines 24-28), shared by training and impact scoring.

A method is a table: which term applies to which triage category. TRACE is
    invert -> relational_flip   prefer y_l over y_w                 (line 24)
    punish -> npo               suppress y_w and y_l                (line 26)
              relational_correction: prefer y_c over y_w             (line 25, oracle-guided)
    retain -> kl                KL(pi_ref || pi_theta) on y_w       (line 27)
and other tables give its ablations and the baselines (relational: prefer y_w over y_l, as DPO;
npo_chosen / npo_rejected: NPO on one response, as U2A; nll: supervised fine-tuning on y_w). Which
table a method uses is its config (conf/method/).

Batches of pair terms stack two responses: rows [0, b) hold the first and rows [b, 2b) the second, in
the order TERM_RESPONSES gives. Single-response terms hold one row per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from trace_realign.losses import RELATIONAL_LOSSES, kl_anchor, npo_loss, npo_single, relational_loss
from trace_realign.model import reference_of
from trace_realign.records import CATEGORIES, INVERT, PUNISH, RETAIN
from trace_realign.sequences import sequence_logps, shift_for_loss

REDUCTIONS = ("mean", "sum")
# Which fields of a record feed each term, in row order.
TERM_RESPONSES: dict[str, tuple[str, ...]] = {
    "relational_flip": ("rejected", "chosen"),
    "relational": ("chosen", "rejected"),
    "relational_correction": ("correction", "chosen"),
    "npo": ("chosen", "rejected"),
    "npo_chosen": ("chosen",),
    "npo_rejected": ("rejected",),
    "kl": ("chosen",),
    "nll": ("chosen",),
}
RELATIONAL_TERMS = ("relational_flip", "relational", "relational_correction")
# Terms on log pi / pi_ref per sequence, which impact scores can be computed for (kl and nll read logits).
SEQUENCE_TERMS = (*RELATIONAL_TERMS, "npo", "npo_chosen", "npo_rejected")
TRACE_TERMS: dict[str, str | None] = {INVERT: "relational_flip", PUNISH: "npo", RETAIN: "kl"}
CONFLICT: tuple[str, ...] = (INVERT, PUNISH)


@dataclass(frozen=True)
class ObjectiveConfig:
    """beta, the relational loss, alpha_KL, how batch sums are reduced, the term table and which
    categories carry the per-sample weights (`weighted`, the conflict set by default).

    reduction="sum" is Algorithm 1 as written: L = sum_i w_i l_i + ... with w summing to 1 over the
    conflict set. reduction="mean" uses w * |D_conflict| (mean 1) and batch means, so uniform weights give
    plain batch-mean losses and alpha_KL keeps its meaning whatever the data size.
    """

    beta: float = 0.1
    relational: str = "sigmoid"
    alpha_kl: float = 0.1
    reduction: str = "mean"
    terms: Mapping[str, str | None] = field(default_factory=lambda: dict(TRACE_TERMS))
    weighted: tuple[str, ...] = CONFLICT
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        extra = set(self.terms) - set(CATEGORIES)
        if extra:
            raise ValueError(f"method.terms: unknown categories {sorted(extra)}; expected {list(CATEGORIES)}")
        object.__setattr__(self, "terms", {c: self.terms.get(c) for c in CATEGORIES})
        unknown = {c: t for c, t in self.terms.items() if t is not None and t not in TERM_RESPONSES}
        if unknown:
            raise ValueError(f"method.terms: unknown terms {unknown}; expected one of {list(TERM_RESPONSES)} or null")
        weighted = tuple(c for c in CATEGORIES if c in set(self.weighted))  # canonical order
        if set(self.weighted) - set(CATEGORIES):
            raise ValueError(f"method.weighted: unknown categories {sorted(set(self.weighted) - set(CATEGORIES))}")
        unweighable = {c: self.terms[c] for c in weighted if self.terms[c] not in (None, *SEQUENCE_TERMS)}
        if unweighable:
            raise ValueError(f"method.weighted: the terms {unweighable} take no per-sample weight; weigh only "
                             f"categories trained by {list(SEQUENCE_TERMS)}")
        object.__setattr__(self, "weighted", weighted)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.relational not in RELATIONAL_LOSSES:
            raise ValueError(f"loss.type: unknown relational loss {self.relational!r}; expected one of {RELATIONAL_LOSSES}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"objective.reduction: {self.reduction!r}; expected one of {REDUCTIONS}")
        if self.beta <= 0:
            raise ValueError(f"loss.beta must be positive, got {self.beta}")
        if self.alpha_kl < 0:
            raise ValueError(f"objective.alpha_kl must be >= 0, got {self.alpha_kl}")

    @property
    def needs_corrections(self) -> bool:
        return "relational_correction" in self.terms.values()


def sequence_losses(term: str, policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Per-sample loss of a batch of a sequence term: stacked pairs (see the module docstring for the row
    layout) or one row per sample for the single-response NPO terms."""
    if term in ("npo_chosen", "npo_rejected"):
        return npo_single(policy_logps, ref_logps, cfg.beta)  # U2A's unlearning loss
    b = policy_logps.shape[0] // 2
    p1, p2, r1, r2 = policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:]
    if term in RELATIONAL_TERMS:
        return relational_loss(p1, p2, r1, r2, cfg.beta, cfg.relational, cfg.label_smoothing)  # lines 24, 25
    if term == "npo":
        return npo_loss(p1, p2, r1, r2, cfg.beta)  # line 26
    raise ValueError(f"{term!r} is not a term on sequence log-probabilities (one of {SEQUENCE_TERMS})")


def category_losses(
    category: str, policy_logps: torch.Tensor, ref_logps: torch.Tensor, cfg: ObjectiveConfig
) -> torch.Tensor:
    """Per-sample loss of a batch of `category` under the configured term table (impact scoring)."""
    term = cfg.terms.get(category)
    if term not in SEQUENCE_TERMS:
        raise ValueError(f"no per-sample loss on log-probabilities for category {category!r} (its term is {term!r})")
    return sequence_losses(term, policy_logps, ref_logps, cfg)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def reference_logps(policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi_ref(y|x), one per row, without gradient."""
    with torch.no_grad(), reference_of(policy, reference) as ref:
        return sequence_logps(forward_logits(ref, batch), batch["labels"])


def policy_and_reference_logps(
    policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_theta(y|x) with gradient and log pi_ref(y|x) without, one per row."""
    ref_logps = reference_logps(policy, reference, batch)
    pol_logps = sequence_logps(forward_logits(policy, batch), batch["labels"])
    return pol_logps, ref_logps


class ReferenceCache:
    """log pi_ref of each training row, computed the first time the row is served and kept: pi_ref never
    changes, so later epochs skip the reference's forward pass (TRL's precomputed reference log-probs,
    made lazily so a run that sees only part of its data pays only for that part)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], tuple[float, ...]] = {}
        self.hits = self.misses = 0

    def __call__(self, policy: nn.Module, reference: nn.Module | None, category: str,
                 batch: dict[str, torch.Tensor], agree: Callable[[bool], bool] | None = None) -> torch.Tensor:
        """`agree`: whether every process hits too (processes that run the reference's forward together)."""
        index = batch["index"].tolist()
        per_row = len(batch["labels"]) // len(index)  # rows stack [first; second] for pair terms
        keys = [(category, i) for i in index]
        hit = all(k in self.rows for k in keys)
        if agree is not None:
            hit = agree(hit)
        if hit:
            self.hits += 1
            cached = [[self.rows[k][j] for k in keys] for j in range(per_row)]
            return torch.tensor([v for part in cached for v in part], dtype=torch.float32, device=batch["labels"].device)
        self.misses += 1
        logps = reference_logps(policy, reference, batch)
        values = logps.detach().cpu().tolist()
        for n, k in enumerate(keys):
            self.rows[k] = tuple(values[j * len(keys) + n] for j in range(per_row))
        return logps


def retain_kl(policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per retained sequence, summed over its response tokens (line 27)."""
    with torch.no_grad(), reference_of(policy, reference) as ref:
        ref_logits = forward_logits(ref, batch)
    pol_logits = forward_logits(policy, batch)
    ref_logits, _, mask = shift_for_loss(ref_logits, batch["labels"])
    pol_logits = pol_logits[:, :-1, :]
    return kl_anchor(ref_logits, pol_logits, mask.to(pol_logits.dtype))


def nll(policy: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token, one value per sequence (supervised fine-tuning)."""
    logps = sequence_logps(forward_logits(policy, batch), batch["labels"])
    n_tokens = (batch["labels"][:, 1:] != -100).sum(-1).clamp(min=1)
    return -logps / n_tokens


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values.sum()
