"""Stage 2, alignment impact weights (Algorithm 1, lines 9-20; Algorithm 2).

With the Hessian approximated as gamma * I, the marginal gain of a conflict sample's update for the gold
objective J is <g_J, g_k> / gamma (paper Eq. 5), where g_J is the gradient of the summed relational loss
on a gold batch and g_k that of sample k's own loss, both at theta_ref. Scores are clipped at 0 and
normalised to sum 1 over the conflict set.

These are exact per-sample gradients and dot products: one backward pass per conflict sample.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from trace_realign.records import PreferencePair

log = logging.getLogger(__name__)

# (prompt, winner, loser): a gold-batch triple for the relational loss.
Triple = tuple[str, str, str]


@dataclass
class GoldBatch:
    triples: list[Triple]
    n_retain: int
    n_invert: int
    n_punish: int


def gold_batch(
    invert: Sequence[PreferencePair],
    punish: Sequence[PreferencePair],
    retain: Sequence[PreferencePair],
    size: int,
    rng: random.Random,
) -> GoldBatch:
    """Algorithm 2: floor(B/3) retained pairs as they are, floor(B/3) inverted pairs flipped, and the rest
    punished prompts with a uniformly drawn compliant response as winner and their chosen as loser.

    UniformSample draws without replacement, so a category smaller than its share gives all it has.
    """
    if size < 1:
        raise ValueError(f"impact.gold_batch_size must be >= 1, got {size}")
    # Line 1: compliant responses are the retained winners and the inverted losers (order kept for seeding).
    compliant = list(dict.fromkeys([p.chosen for p in retain] + [p.rejected for p in invert]))
    b_r, b_i = min(len(retain), size // 3), min(len(invert), size // 3)  # line 2
    triples: list[Triple] = [(p.prompt, p.chosen, p.rejected) for p in rng.sample(list(retain), b_r)]  # line 3
    triples += [(p.prompt, p.rejected, p.chosen) for p in rng.sample(list(invert), b_i)]  # line 4
    n_p = 0
    if compliant and punish:  # line 5
        b_p = min(size - len(triples), len(punish))  # line 6
        for p in rng.sample(list(punish), b_p):  # line 7
            triples.append((p.prompt, rng.choice(compliant), p.chosen))
        n_p = b_p
    return GoldBatch(triples=triples, n_retain=b_r, n_invert=b_i, n_punish=n_p)


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """d loss / d params, flattened into one vector (zeros for parameters the loss does not touch)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gold_gradient(params: Sequence[torch.Tensor], chunk_losses: Iterable[Callable[[], torch.Tensor]]) -> torch.Tensor:
    """g_J (line 10): the gradient of the gold loss, summed over chunks so memory stays bounded."""
    total = None
    for make_loss in chunk_losses:
        g = flat_grad(make_loss(), params)
        total = g if total is None else total + g
    if total is None:
        raise ValueError("the gold batch is empty: impact weights need at least one retained, inverted or punished pair")
    return total


def impact_scores(
    params: Sequence[torch.Tensor],
    g_gold: torch.Tensor,
    sample_losses: Sequence[Callable[[], torch.Tensor] | None],
    progress: bool = True,
) -> torch.Tensor:
    """w_k = <g_J, g_k> for every sample (lines 12-19); a None entry (another rank's sample) scores 0."""
    scores = torch.zeros(len(sample_losses), dtype=torch.float64)
    for k, make_loss in enumerate(tqdm(sample_losses, desc="impact", unit="pair", disable=not progress, leave=False)):
        if make_loss is None:
            continue
        scores[k] = torch.dot(g_gold.double(), flat_grad(make_loss(), params).double())
    return scores


def clip_and_normalise(
    scores: torch.Tensor, gamma: float, served: torch.Tensor | None = None, top_k: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Line 20: w <- max(0, w / gamma), then w / sum|w|. With top_k, only the k highest clipped scores
    keep their weight (U2A's selection of the samples that help the gold objective most; ties by index).

    If every score clips to zero, no sample helps the gold objective at theta_ref and Algorithm 1 leaves
    nothing to train on; the weights then fall back to uniform over the `served` samples (those a term
    trains; all by default) and the fallback is reported.
    """
    if gamma <= 0:
        raise ValueError(f"impact.gamma must be positive, got {gamma}")
    if not torch.isfinite(scores).all():
        bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
        raise FloatingPointError(f"impact scores are not finite for conflict samples {bad[:10]} (of {len(bad)})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"impact.top_k must be >= 1 or null, got {top_k}")
    w = torch.clamp(scores / gamma, min=0.0)
    if top_k is not None and top_k < len(w):
        # a stable sort keeps the lower index first among equal scores, so the choice is deterministic
        order = torch.sort(-w, stable=True).indices
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[order[:top_k]] = True
        w = torch.where(keep, w, torch.zeros_like(w))
    z = w.abs().sum()
    info = {
        "impact/nonzero": int((w > 0).sum()),
        "impact/fallback_uniform": 0,
        "impact/raw_positive_fraction": float((scores > 0).double().mean()) if len(scores) else 0.0,
    }
    if len(w) == 0:
        return w, info
    if z <= 0:
        log.warning("every impact score clipped to 0: using uniform weights")
        info["impact/fallback_uniform"] = 1
        w, _ = uniform_weights(len(w), served)
    else:
        w = w / z
    info["impact/max"] = float(w.max())
    info["impact/min"] = float(w.min())
    return w, info


def uniform_weights(n: int, served: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The no_impact ablation: every served conflict sample weighs the same (unserved ones 0)."""
    mask = torch.ones(n, dtype=torch.float64) if served is None else served.to(torch.float64)
    w = mask / mask.sum() if mask.sum() > 0 else mask
    return w, {"impact/nonzero": int((w > 0).sum()), "impact/max": float(w.max()) if n else 0.0,
               "impact/fallback_uniform": 0}
