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

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN
from trace_realign.core.sequences import IGNORE_INDEX, at_least_float32, sequence_logps, shift_for_loss
from trace_realign.method.losses import (
    RELATIONAL_LOSSES,
    kl_anchor,
    kl_from_log_probs,
    npo_loss,
    npo_single,
    relational_loss,
)
from trace_realign.models.loading import reference_of

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

    fused_forward: True (the default), a training step runs one policy forward over the rows
    of every category (and one reference forward): fewer calls, where calls bound a step (small steps on a
    GPU; under FSDP each forward gathers every layer); the embedded default's step on 2 CPU cores is 7 %
    faster fused. False, one of each per category: a lower peak (each call's working memory covers one
    category's rows), for a large model on a CPU. "auto": fused on an accelerator, per category on a CPU.
    """

    beta: float = 0.1
    relational: str = "sigmoid"
    alpha_kl: float = 0.1
    reduction: str = "mean"
    terms: Mapping[str, str | None] = field(default_factory=lambda: dict(TRACE_TERMS))
    weighted: tuple[str, ...] = CONFLICT
    label_smoothing: float = 0.0
    fused_forward: bool | str = True
    # an NLL term on the winner of the relational terms of these categories (RPO, Pang et al. 2024):
    # nll_weight x the winner's mean token negative log-likelihood, added to each sample's loss
    nll_weight: float = 0.0
    nll_categories: tuple[str, ...] = ()

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
        if self.fused_forward not in (True, False, "auto"):
            raise ValueError(f"objective.fused_forward: {self.fused_forward!r}; expected true, false or auto")
        if self.nll_weight < 0:
            raise ValueError(f"method.nll.weight must be >= 0, got {self.nll_weight}")
        no_winner = {c: self.terms.get(c) for c in self.nll_categories if self.terms.get(c) not in RELATIONAL_TERMS}
        if no_winner:
            raise ValueError(f"method.nll.categories: {no_winner} have no winner to raise; the NLL term applies to "
                             f"categories trained by {list(RELATIONAL_TERMS)}")
        object.__setattr__(self, "nll_categories", tuple(self.nll_categories))

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


def scored_width(labels: torch.Tensor) -> int:
    """How many of the batch's last columns have logits that score a label: from the column before its
    first response token on (all columns when none scores one)."""
    scored = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return labels.shape[1] - int(scored[0]) if len(scored) else labels.shape[1]


# models whose forward refused logits_to_keep (weakly held: a model's memory is freed with it)
_WITHOUT_LOGITS_TO_KEEP: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor], keep: int | None = None) -> torch.Tensor:
    """The logits of the batch's last `keep` columns (default: its scored_width), which shift_for_loss
    aligns with the labels: a prompt's logits score nothing, and the output layer over a vocabulary is the
    widest matmul of a small model and the largest tensor of a large one (TRL's use_logits_to_keep)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if model in _WITHOUT_LOGITS_TO_KEEP:
        return model(**inputs).logits
    keep = scored_width(batch["labels"]) if keep is None else keep
    try:
        return model(**inputs, logits_to_keep=keep).logits
    except TypeError as exc:  # a model without the argument (remote code, say): every column's logits
        if "logits_to_keep" not in str(exc):
            raise
        # asked once per model: a forward that rejects it only after some work would otherwise repeat that work
        _WITHOUT_LOGITS_TO_KEEP.add(model)
        return model(**inputs).logits


def fuse_rows(parts: Sequence[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int]]]:
    """The rows of several right-padded batches as one batch, padded to the widest, with each batch's
    (first row, end row, width) in it."""
    width = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    fused = {k: torch.cat([F.pad(p[k], (0, width - p[k].shape[1]), value=v) for p in parts]) for k, v in fill.items()}
    spans, start = [], 0
    for p in parts:
        n = p["input_ids"].shape[0]
        spans.append((start, start + n, p["input_ids"].shape[1]))
        start += n
    return fused, spans


def fused_logits(model: nn.Module, parts: Sequence[dict[str, torch.Tensor]], fused: bool = True) -> Iterator[torch.Tensor]:
    """Each batch's logits from one forward pass over the rows of all of them (fused=False: one pass per
    batch). One call instead of one per batch: on a GPU a small step is bound by calls, not arithmetic,
    and under FSDP each forward gathers every layer again. Right padding keeps this exact: causal
    attention never reads the padding after a row's own tokens, so a row's logits up to its width are its
    own batch's (up to the last bits of the arithmetic). One pass per batch runs lazily, each when its
    logits are asked for, so the caller can be done with one batch's before the next is computed."""
    if len(parts) == 1 or not fused:
        return (forward_logits(model, p) for p in parts)
    rows, spans = fuse_rows(parts)
    # Each batch gets the logits of its own scored columns, as a pass of its own would give them: the
    # reference's pass and the policy's may fuse different batches, and a KL compares them column by column.
    unscored = [w - scored_width(p["labels"]) for p, (_, _, w) in zip(parts, spans)]  # leading columns
    width = rows["input_ids"].shape[1]
    logits = forward_logits(model, rows, keep=width - min(unscored))
    first = width - logits.shape[1]  # the position of the logits' first column (0: a model gave every column)
    return iter([logits[a:b, u - first : w - first] for (a, b, w), u in zip(spans, unscored)])


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
        self.dtype = torch.float32  # that of the log-probs stored (float64 under model.dtype=float64)

    @staticmethod
    def _layout(category: str, batch: dict[str, torch.Tensor]) -> tuple[list[tuple[str, int]], int]:
        """The batch's cache keys, one per sample, and its rows per sample (pair terms stack [first; second])."""
        keys = [(category, i) for i in batch["index"].tolist()]
        return keys, len(batch["labels"]) // len(keys)

    def lookup(self, category: str, batch: dict[str, torch.Tensor],
               agree: Callable[[bool], bool] | None = None) -> torch.Tensor | None:
        """The batch's cached log-probs, or None (a miss: compute them and `store` them).
        `agree`: whether every process hits too (processes that run the reference's forward together)."""
        keys, per_row = self._layout(category, batch)
        hit = all(k in self.rows for k in keys)
        if agree is not None:
            hit = agree(hit)
        if not hit:
            self.misses += 1
            return None
        self.hits += 1
        cached = [[self.rows[k][j] for k in keys] for j in range(per_row)]
        return torch.tensor([v for part in cached for v in part], dtype=self.dtype, device=batch["labels"].device)

    def store(self, category: str, batch: dict[str, torch.Tensor], logps: torch.Tensor) -> None:
        keys, per_row = self._layout(category, batch)
        values, self.dtype = logps.detach().cpu().tolist(), logps.dtype
        for n, k in enumerate(keys):
            self.rows[k] = tuple(values[j * len(keys) + n] for j in range(per_row))

    def __call__(self, policy: nn.Module, reference: nn.Module | None, category: str,
                 batch: dict[str, torch.Tensor], agree: Callable[[bool], bool] | None = None) -> torch.Tensor:
        logps = self.lookup(category, batch, agree)
        if logps is None:
            logps = reference_logps(policy, reference, batch)
            self.store(category, batch, logps)
        return logps


def kl_from_logits(ref_logits: torch.Tensor, policy_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per sequence, summed over its response tokens, from both models' logits."""
    ref_logits, _, mask = shift_for_loss(ref_logits, labels)
    return kl_anchor(ref_logits, policy_logits[:, :-1, :], mask.to(policy_logits.dtype))


def retain_kl(policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per retained sequence, summed over its response tokens (line 27)."""
    with torch.no_grad(), reference_of(policy, reference) as ref:
        ref_logits = forward_logits(ref, batch)
    return kl_from_logits(ref_logits, forward_logits(policy, batch), batch["labels"])


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The number of response tokens each sequence scores (at least 1), to turn a sum into a token mean."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per response token, one value per sequence."""
    return -sequence_logps(logits, labels) / response_tokens(labels)


def nll(policy: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood per response token, one value per sequence (supervised fine-tuning)."""
    return nll_from_logits(forward_logits(policy, batch), batch["labels"])


def response_logps(category: str, term: str, policy_logps: torch.Tensor, ref_logps: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The batch mean of log pi_theta(y|x) per response a term reads, and of log pi_theta/pi_ref where
    pi_ref was computed: `<category>/<field>` and `<category>/<field>/ratio` (detached). What moves where:
    a relational loss can raise the margin by pushing its loser down while its winner falls too (the
    likelihood displacement of Razin et al., 2025), which these show step by step, as TRL's logps/* do."""
    fields = TERM_RESPONSES[term]
    rows = policy_logps.detach().reshape(len(fields), -1)
    out = {f"{category}/{f}": rows[i].mean() for i, f in enumerate(fields)}
    if ref_logps is not None:
        ratio = (policy_logps.detach() - ref_logps).reshape(len(fields), -1)
        out.update({f"{category}/{f}/ratio": ratio[i].mean() for i, f in enumerate(fields)})
    return out


def step_terms(
    policy: nn.Module, reference: nn.Module | None, parts: Mapping[str, dict[str, torch.Tensor]],
    cfg: ObjectiveConfig, cache: ReferenceCache, agree: Callable[[bool], bool] | None = None,
    logps: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every category's per-sample term values for one training step, from one reference forward (the rows
    whose log pi_ref the cache lacks, and the KL's rows) and one policy forward over all rows (one of each
    per category when cfg.fused_forward says so).

    A KL term that does not train (alpha_kl = 0, the no_kl ablation) is still computed, for the log, but
    apart and without gradient, so its rows cost the policy's backward nothing. `logps`, when given, is
    filled with each trained category's response log-probabilities (response_logps)."""
    terms = {c: cfg.terms[c] for c in parts}
    fuse = cfg.fused_forward
    if fuse == "auto":
        fuse = next(iter(parts.values()))["input_ids"].device.type != "cpu"
    train_kl = cfg.alpha_kl > 0
    trained = [c for c in parts if terms[c] != "kl" or train_kl]  # in the policy's forward with gradient
    ref = {c: cache.lookup(c, parts[c], agree) for c in parts if terms[c] in SEQUENCE_TERMS}
    need = [c for c in trained if terms[c] == "kl" or (c in ref and ref[c] is None)]
    ref_logits: dict[str, torch.Tensor] = {}
    if need:
        with torch.no_grad(), reference_of(policy, reference) as model:
            for c, logits in zip(need, fused_logits(model, [parts[c] for c in need], fuse)):
                if terms[c] == "kl":
                    # a view would keep every row's logits alive through the policy's forward
                    ref_logits[c] = logits.clone() if len(need) > 1 and fuse else logits
                else:
                    ref[c] = sequence_logps(logits, parts[c]["labels"])
                    cache.store(c, parts[c], ref[c])
    out: dict[str, torch.Tensor] = {}
    for c, logits in zip(trained, fused_logits(policy, [parts[c] for c in trained], fuse) if trained else []):
        labels = parts[c]["labels"]
        if terms[c] == "kl":
            # kl_from_logits, with the policy's log-softmax kept: it also gives log pi(y) for the log
            ref_l, targets, mask = shift_for_loss(ref_logits.pop(c), labels)
            pol_logp = F.log_softmax(at_least_float32(logits[:, :-1, :]), dim=-1)
            out[c] = kl_from_log_probs(F.log_softmax(at_least_float32(ref_l), dim=-1), pol_logp, mask.to(logits.dtype))
            if logps is not None:
                seq = (pol_logp.detach().gather(2, targets.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
                logps.update(response_logps(c, "kl", seq, None))
        elif terms[c] == "nll":
            pol = sequence_logps(logits, labels)  # one log-softmax serves the loss and the log
            if logps is not None:
                logps.update(response_logps(c, "nll", pol, None))
            out[c] = -pol / response_tokens(labels)
        else:
            pol = sequence_logps(logits, labels)
            if logps is not None:
                logps.update(response_logps(c, terms[c], pol, ref[c]))
            out[c] = sequence_losses(terms[c], pol, ref[c], cfg)
            if cfg.nll_weight and c in cfg.nll_categories:
                out[c] = out[c] + cfg.nll_weight * winner_nll(pol, labels)
    for c in parts:
        if c not in out:  # the KL that does not train
            with torch.no_grad():
                out[c] = retain_kl(policy, reference, parts[c])
    return {c: out[c] for c in parts}


def winner_nll(policy_logps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of each pair's winner (the first half of the stacked rows)."""
    b = policy_logps.shape[0] // 2
    return -policy_logps[:b] / response_tokens(labels[:b])


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    return values.mean() if reduction == "mean" else values.sum()
