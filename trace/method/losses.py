"""The TRACE losses as functions of tensors (Algorithm 1, "where:" block; paper Eqs. 1-3).

Inputs are per-sequence log-probabilities log pi(y|x) (summed over response tokens) under the trainable
policy and the frozen reference. Every function returns one loss per sample; reduction and the impact
weights w are applied by the objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trace_realign.core.sequences import at_least_float32

RELATIONAL_LOSSES = ("sigmoid", "ipo", "robust")


def log_ratio_margin(
    policy_pos: torch.Tensor, policy_neg: torch.Tensor, ref_pos: torch.Tensor, ref_neg: torch.Tensor
) -> torch.Tensor:
    """Delta_theta(x, y+, y-) = log pi(y+)/pi_ref(y+) - log pi(y-)/pi_ref(y-)."""
    return (policy_pos - ref_pos) - (policy_neg - ref_neg)


def relational_loss(
    policy_pos: torch.Tensor,
    policy_neg: torch.Tensor,
    ref_pos: torch.Tensor,
    ref_neg: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Loss that prefers y+ over y-.

    sigmoid: -log sigma(beta * Delta), as Algorithm 1 writes l_IPO (the DPO form); with label_smoothing
             eps > 0, conservative DPO: -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta).
    ipo:     (Delta - 1/(2 beta))^2, the squared loss of Azar et al. (2024).
    robust:  robust DPO (Chowdhury et al., 2024), unbiased when labels flip at rate eps:
             (-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)) / (1 - 2 eps).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    delta = log_ratio_margin(policy_pos, policy_neg, ref_pos, ref_neg)
    if kind == "sigmoid":
        if label_smoothing == 0.0:
            return -F.logsigmoid(beta * delta)
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if kind == "ipo":
        return (delta - 1.0 / (2.0 * beta)) ** 2
    if kind == "robust":
        eps = label_smoothing
        return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    raise ValueError(f"unknown relational loss {kind!r}; expected one of {RELATIONAL_LOSSES}")


def npo_loss(
    policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """NPO on both responses: -log sigma(-beta log pi/pi_ref (y_w)) - log sigma(-beta log pi/pi_ref (y_l))."""
    return npo_single(policy_w, ref_w, beta) + npo_single(policy_l, ref_l, beta)


def npo_single(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO on one response: -log sigma(-beta log pi/pi_ref (y)) (U2A's unlearning loss)."""
    return -F.logsigmoid(-beta * (policy - ref))


def kl_anchor(ref_logits: torch.Tensor, policy_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(pi_ref(.|x, y<t) || pi_theta(.|x, y<t)) over the full vocabulary, summed over masked tokens.

    ref_logits, policy_logits: [batch, time, vocab], aligned with `mask` [batch, time] (1 on the
    response tokens being predicted). Returns one value per sequence.
    """
    ref_logp = F.log_softmax(at_least_float32(ref_logits), dim=-1)
    pol_logp = F.log_softmax(at_least_float32(policy_logits), dim=-1)
    return kl_from_log_probs(ref_logp, pol_logp, mask)


def kl_from_log_probs(ref_logp: torch.Tensor, pol_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """kl_anchor from both models' log-softmaxed logits (a caller that also reads log pi(y) shares them)."""
    per_token = (ref_logp.exp() * (ref_logp - pol_logp)).sum(-1)
    return (per_token * mask).sum(-1)
