"""The TRACE losses (Algorithm 1, "where:" block) against numbers written out from the formulas by hand.

Expected values are computed with math.log / math.exp on plain floats, never with the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from trace_realign.core.records import INVERT, PUNISH, RETAIN
from trace_realign.method.losses import kl_anchor, log_ratio_margin, npo_loss, relational_loss
from trace_realign.method.objective import TRACE_TERMS, ObjectiveConfig, category_losses

# Per-sequence log-probabilities for three samples; Delta is positive, negative and zero in turn.
POL_POS = [-3.0, -6.0, -2.0]
POL_NEG = [-5.0, -4.0, -7.0]
REF_POS = [-4.0, -5.0, -2.5]
REF_NEG = [-4.5, -5.5, -7.5]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def neg_log_sigmoid(z: float) -> float:
    # -log sigma(z) = log(1 + exp(-z)), written out by hand.
    return math.log(1.0 + math.exp(-z))


def deltas():
    return [(pp - rp) - (pn - rn) for pp, pn, rp, rn in zip(POL_POS, POL_NEG, REF_POS, REF_NEG)]


def test_hand_deltas_cover_both_signs_and_zero():
    # Guards the fixture itself: the numbers below only test something if Delta takes varied values.
    assert deltas() == [1.5, -2.5, 0.0]
    assert log_ratio_margin(t(POL_POS), t(POL_NEG), t(REF_POS), t(REF_NEG)).tolist() == [1.5, -2.5, 0.0]


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_relational_sigmoid_matches_formula(beta):
    got = relational_loss(t(POL_POS), t(POL_NEG), t(REF_POS), t(REF_NEG), beta, kind="sigmoid")
    expected = [neg_log_sigmoid(beta * d) for d in deltas()]
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_relational_sigmoid_is_the_default_kind():
    got = relational_loss(t(POL_POS), t(POL_NEG), t(REF_POS), t(REF_NEG), 0.5)
    assert got.tolist() == pytest.approx([neg_log_sigmoid(0.5 * d) for d in deltas()], rel=1e-12)


def test_relational_sigmoid_prefers_the_positive_response():
    # Swapping y+ and y- must change the loss (Delta -> -Delta); a loss symmetric in the pair would be wrong.
    a = relational_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 1.0)
    b = relational_loss(t([-3.0]), t([-1.0]), t([-2.0]), t([-2.0]), 1.0)
    assert float(a) == pytest.approx(neg_log_sigmoid(2.0))
    assert float(b) == pytest.approx(neg_log_sigmoid(-2.0))
    assert float(a) < math.log(2.0) < float(b)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_relational_ipo_matches_formula(beta):
    got = relational_loss(t(POL_POS), t(POL_NEG), t(REF_POS), t(REF_NEG), beta, kind="ipo")
    expected = [(d - 1.0 / (2.0 * beta)) ** 2 for d in deltas()]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_relational_ipo_is_zero_at_its_target_margin():
    beta = 0.25  # target margin 1/(2 beta) = 2
    got = relational_loss(t([0.0]), t([-2.0]), t([0.0]), t([0.0]), beta, kind="ipo")
    assert float(got) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_matches_formula(beta):
    pw, pl, rw, rl = POL_POS, POL_NEG, REF_POS, REF_NEG
    got = npo_loss(t(pw), t(pl), t(rw), t(rl), beta)
    expected = [
        neg_log_sigmoid(-beta * (a - c)) + neg_log_sigmoid(-beta * (b - d)) for a, b, c, d in zip(pw, pl, rw, rl)
    ]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_npo_penalises_each_response_separately():
    # NPO is not a margin: raising both log-ratios by the same amount must raise the loss.
    low = npo_loss(t([-2.0]), t([-3.0]), t([-2.0]), t([-3.0]), 1.0)
    high = npo_loss(t([-1.0]), t([-2.0]), t([-2.0]), t([-3.0]), 1.0)
    assert float(high) == pytest.approx(2 * neg_log_sigmoid(-1.0))
    assert float(high) > float(low)


@pytest.mark.parametrize("beta", [0.05, 1.0, 7.0])
def test_losses_at_theta_ref(beta):
    # At theta = theta_ref every log-ratio is 0: sigma(0) = 1/2, so l_rel = log 2 and l_NPO = 2 log 2 per pair.
    logps = t([-1.0, -12.5, -40.0])
    others = t([-3.0, -0.5, -7.0])
    rel = relational_loss(logps, others, logps.clone(), others.clone(), beta, kind="sigmoid")
    npo = npo_loss(logps, others, logps.clone(), others.clone(), beta)
    assert rel.tolist() == pytest.approx([math.log(2.0)] * 3, rel=1e-12)
    assert npo.tolist() == pytest.approx([2 * math.log(2.0)] * 3, rel=1e-12)


def test_unknown_relational_kind_raises():
    with pytest.raises(ValueError, match="unknown relational loss"):
        relational_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), 0.1, kind="hinge")


def test_relational_gradient_sign_at_theta_ref():
    # d(-log sigma(beta*Delta))/d pi_pos = -beta*sigma(-beta*Delta) = -beta/2 at Delta = 0.
    pos = t([-2.0]).requires_grad_(True)
    neg = t([-3.0]).requires_grad_(True)
    relational_loss(pos, neg, t([-2.0]), t([-3.0]), 0.4).sum().backward()
    assert float(pos.grad) == pytest.approx(-0.2)
    assert float(neg.grad) == pytest.approx(0.2)


# -- KL anchor --


def kl_by_hand(ref_logits, pol_logits, mask):
    """Explicit loops: sum over masked (b, t) of sum_v p_ref (log p_ref - log p_pol)."""
    out = []
    for b in range(ref_logits.shape[0]):
        total = 0.0
        for tt in range(ref_logits.shape[1]):
            if not mask[b][tt]:
                continue
            ref_row = [float(x) for x in ref_logits[b, tt]]
            pol_row = [float(x) for x in pol_logits[b, tt]]
            ref_z = math.log(sum(math.exp(x) for x in ref_row))
            pol_z = math.log(sum(math.exp(x) for x in pol_row))
            for r, p in zip(ref_row, pol_row):
                log_pr, log_pp = r - ref_z, p - pol_z
                total += math.exp(log_pr) * (log_pr - log_pp)
        out.append(total)
    return out


def test_kl_anchor_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 2
    pol = torch.randn(2, 4, 6, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    got = kl_anchor(ref, pol, mask)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(kl_by_hand(ref, pol, mask.bool().tolist()), rel=1e-5)


def test_kl_anchor_excludes_masked_tokens():
    # Changing the policy logits where mask == 0 must not change the KL.
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, 5, 7, generator=g)
    pol = torch.randn(1, 5, 7, generator=g)
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    before = kl_anchor(ref, pol, mask)
    pol2 = pol.clone()
    pol2[0, [0, 2, 4]] += torch.randn(3, 7, generator=g) * 5
    after = kl_anchor(ref, pol2, mask)
    assert torch.allclose(before, after)
    # ... and changing them where mask == 1 must.
    pol3 = pol.clone()
    pol3[0, 1] += torch.randn(7, generator=g) * 5
    assert not torch.allclose(before, kl_anchor(ref, pol3, mask))


def test_kl_anchor_zero_when_logits_equal_positive_otherwise():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(3, 4, 9, generator=g)
    mask = torch.ones(3, 4)
    assert kl_anchor(ref, ref.clone(), mask).abs().max() < 1e-6
    # Adding a constant per position leaves the distribution unchanged: still zero.
    assert kl_anchor(ref, ref + 3.0, mask).abs().max() < 1e-5
    other = ref + torch.randn(3, 4, 9, generator=g)
    assert (kl_anchor(ref, other, mask) > 0).all()


def test_kl_anchor_is_forward_kl_not_reverse():
    # KL(p_ref || p_pol) is asymmetric: swapping the arguments must give the other direction's value.
    ref = torch.tensor([[[2.0, 0.0, -1.0]]], dtype=torch.float64)
    pol = torch.tensor([[[0.0, 0.0, 0.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    z = math.exp(2.0) + 1.0 + math.exp(-1.0)
    p = [math.exp(2.0) / z, 1.0 / z, math.exp(-1.0) / z]
    forward = sum(pi * (math.log(pi) - math.log(1 / 3)) for pi in p)
    reverse = sum((1 / 3) * (math.log(1 / 3) - math.log(pi)) for pi in p)
    assert abs(forward - reverse) > 1e-3
    # kl_anchor computes in float32, hence the tolerance.
    assert float(kl_anchor(ref, pol, mask)) == pytest.approx(forward, rel=1e-6)


# -- category_losses row layout --

FIRST_POL, SECOND_POL = [-2.0, -6.0], [-5.0, -3.0]
FIRST_REF, SECOND_REF = [-3.0, -4.0], [-4.0, -4.5]


def stacked():
    # Rows [0, b) hold the first response, rows [b, 2b) the second.
    return t(FIRST_POL + SECOND_POL), t(FIRST_REF + SECOND_REF)


@pytest.mark.parametrize("relational", ["sigmoid", "ipo"])
def test_category_losses_invert_is_relational_first_over_second(relational):
    cfg = ObjectiveConfig(beta=0.3, relational=relational)
    pol, ref = stacked()
    got = category_losses(INVERT, pol, ref, cfg)
    ds = [(a - c) - (b - d) for a, b, c, d in zip(FIRST_POL, SECOND_POL, FIRST_REF, SECOND_REF)]
    if relational == "sigmoid":
        expected = [neg_log_sigmoid(0.3 * d) for d in ds]
    else:
        expected = [(d - 1 / 0.6) ** 2 for d in ds]
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_category_losses_punish_is_npo_on_both_rows():
    cfg = ObjectiveConfig(beta=0.3)
    pol, ref = stacked()
    got = category_losses(PUNISH, pol, ref, cfg)
    expected = [
        neg_log_sigmoid(-0.3 * (a - c)) + neg_log_sigmoid(-0.3 * (b - d))
        for a, b, c, d in zip(FIRST_POL, SECOND_POL, FIRST_REF, SECOND_REF)
    ]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_category_losses_oracle_punish_is_relational():
    cfg = ObjectiveConfig(beta=0.3, terms={**TRACE_TERMS, "punish": "relational_correction"})
    pol, ref = stacked()
    got = category_losses(PUNISH, pol, ref, cfg)
    ds = [(a - c) - (b - d) for a, b, c, d in zip(FIRST_POL, SECOND_POL, FIRST_REF, SECOND_REF)]
    assert got.tolist() == pytest.approx([neg_log_sigmoid(0.3 * d) for d in ds], rel=1e-12)
    # ... and differs from the NPO value on the same rows.
    npo = category_losses(PUNISH, pol, ref, ObjectiveConfig(beta=0.3))
    assert not torch.allclose(got, npo)


def test_category_losses_rejects_retain():
    pol, ref = stacked()
    with pytest.raises(ValueError, match="no per-sample loss on log-probabilities for category .retain. \(its term is .kl.\)"):
        category_losses(RETAIN, pol, ref, ObjectiveConfig())


# -- ObjectiveConfig validation --


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"relational": "hinge"}, "unknown relational loss"),
        ({"reduction": "max"}, "reduction"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.5}, "beta"),
        ({"alpha_kl": -0.1}, "alpha_kl"),
    ],
)
def test_objective_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kwargs)


def test_objective_config_accepts_valid_edges():
    # alpha_kl = 0 (the no_kl ablation) and both reductions / relational losses are valid.
    for relational in ("sigmoid", "ipo"):
        for reduction in ("mean", "sum"):
            cfg = ObjectiveConfig(beta=1e-6, relational=relational, alpha_kl=0.0, reduction=reduction)
            assert (cfg.beta, cfg.relational, cfg.alpha_kl, cfg.reduction) == (1e-6, relational, 0.0, reduction)
    # only a table with the oracle-guided term needs corrections written at triage
    assert not ObjectiveConfig().needs_corrections
    assert ObjectiveConfig(terms={**TRACE_TERMS, PUNISH: "relational_correction"}).needs_corrections


def test_term_table_validation_and_dpo_term():
    with pytest.raises(ValueError, match="unknown terms"):
        ObjectiveConfig(terms={INVERT: "dpo_typo"})
    # relational on retained pairs prefers y_w over y_l: the plain DPO loss on rows (chosen, rejected).
    cfg = ObjectiveConfig(beta=0.5, terms={RETAIN: "relational"})
    pol = torch.tensor([-1.0, -3.0])
    ref = torch.tensor([-2.0, -2.0])
    expected = -math.log(1 / (1 + math.exp(-0.5 * ((-1 + 2) - (-3 + 2)))))
    assert category_losses(RETAIN, pol, ref, cfg).item() == pytest.approx(expected)
    assert cfg.terms == {INVERT: None, PUNISH: None, RETAIN: "relational"}


def test_nll_is_mean_token_negative_log_likelihood_of_the_response():
    from trace_realign.method.objective import nll

    class Fixed(torch.nn.Module):
        """A 'model' whose logits are given, to check nll against a hand computation."""

        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask, use_cache=False):
            return type("Out", (), {"logits": self.logits})()

    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = torch.tensor([[-100, -100, 3, 4, 5]])  # two prompt tokens, three response tokens
    got = nll(Fixed(logits), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    logp = torch.log_softmax(logits[0], -1)
    expected = -(logp[1, 3] + logp[2, 4] + logp[3, 5]) / 3
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_reference_cache_computes_each_row_once_and_returns_the_same_values():
    from trace_realign.method.objective import ReferenceCache, reference_logps

    class Counting(torch.nn.Module):
        """A fixed 'reference': logits from a seeded table, counting its forward passes."""

        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(16, 16)
            self.calls = 0

        def forward(self, input_ids, attention_mask, use_cache=False):
            self.calls += 1
            return type("Out", (), {"logits": self.table(input_ids)})()

    torch.manual_seed(0)
    ref = Counting()
    ids = torch.randint(0, 16, (4, 6))  # a pair batch of 2 samples: rows [first0, first1, second0, second1]
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "index": torch.tensor([7, 3])}
    cache = ReferenceCache()
    first = cache(None, ref, "invert", batch)
    assert ref.calls == 1 and cache.misses == 1
    again = cache(None, ref, "invert", batch)
    assert ref.calls == 1 and cache.hits == 1  # served from the cache
    assert torch.equal(first, again) and torch.allclose(first, reference_logps(None, ref, batch))
    # the same indices of another category are other rows
    cache(None, ref, "punish", batch)
    assert ref.calls == 3
    # a batch in another order returns its own rows' values
    swapped = {k: (v[[1, 0, 3, 2]] if k != "index" else v[[1, 0]]) for k, v in batch.items()}
    assert torch.equal(cache(None, ref, "invert", swapped), first[[1, 0, 3, 2]])


def test_response_logps_are_each_responses_batch_mean_and_its_ratio_to_the_reference():
    from trace_realign.method.objective import response_logps

    # a relational_flip batch of two samples: rows [rejected0, rejected1, chosen0, chosen1]
    pol, ref = t([-1.0, -3.0, -10.0, -20.0]), t([-2.0, -2.0, -9.0, -9.0])
    got = {k: v.item() for k, v in response_logps("invert", "relational_flip", pol, ref).items()}
    assert got == {"invert/rejected": -2.0, "invert/chosen": -15.0,
                   "invert/rejected/ratio": 0.0, "invert/chosen/ratio": (-1.0 + -11.0) / 2}
    # a single-response term without a reference (the KL's rows)
    assert {k: v.item() for k, v in response_logps("retain", "kl", t([-4.0, -6.0]), None).items()} == {"retain/chosen": -5.0}


def test_the_nll_term_adds_the_winners_mean_token_nll_to_its_categorys_loss():
    from trace_realign.method.objective import winner_nll

    # two pairs stacked [winner0, winner1, loser0, loser1]; the winners have 2 and 4 response tokens
    labels = torch.full((4, 6), -100)
    labels[0, 4:] = 1
    labels[1, 2:] = 1
    labels[2:, 3:] = 1
    got = winner_nll(t([-3.0, -8.0, -1.0, -1.0]), labels)
    assert got.tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match="method.nll.categories"):
        ObjectiveConfig(nll_weight=1.0, nll_categories=("punish",))  # TRACE punishes with NPO: no winner
    with pytest.raises(ValueError, match="method.nll.weight"):
        ObjectiveConfig(nll_weight=-1.0)
    ObjectiveConfig(nll_weight=1.0, nll_categories=("invert",))
