"""Stage 2: the gold batch (Algorithm 2), clipping/normalising (Algorithm 1 line 20), and the impact scores
<g_J, g_k> (lines 10-19) against a brute-force computation with .backward() on a tiny model."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from trace_realign.core.records import INVERT, PUNISH, RETAIN, PreferencePair
from trace_realign.core.sequences import SequenceLimits, encode_pair
from trace_realign.method.datamodule import collate
from trace_realign.method.impact import (
    clip_and_normalise,
    flat_grad,
    gold_batch,
    gold_gradient,
    impact_scores,
    uniform_weights,
)
from trace_realign.method.objective import TRACE_TERMS, ObjectiveConfig, category_losses, policy_and_reference_logps
from trace_realign.models.loading import build_tiny_model_dir, load_policy, load_tokenizer, trainable_parameters


def pairs(tag: str, n: int, category: str) -> list[PreferencePair]:
    # Distinct strings per category and index, so every triple can be traced back to its source pair.
    return [PreferencePair(f"{tag}x{i}", f"{tag}w{i}", f"{tag}l{i}", category) for i in range(n)]


def by_pair(ps):
    return {p.prompt: p for p in ps}


# ---------------------------------------------------------------- gold_batch (Algorithm 2)


def classify(triples, invert, punish, retain):
    """Split gold triples by the category of their prompt, checking each has the shape Algorithm 2 gives."""
    inv, pun, ret = by_pair(invert), by_pair(punish), by_pair(retain)
    compliant = {p.chosen for p in retain} | {p.rejected for p in invert}
    out = {RETAIN: [], INVERT: [], PUNISH: []}
    for x, w, l in triples:
        if x in ret:
            assert (w, l) == (ret[x].chosen, ret[x].rejected)  # line 3: as it is
            out[RETAIN].append(x)
        elif x in inv:
            assert (w, l) == (inv[x].rejected, inv[x].chosen)  # line 4: flipped
            out[INVERT].append(x)
        elif x in pun:
            assert w in compliant  # line 7: a compliant winner...
            assert l == pun[x].chosen  # ... over the punished pair's chosen
            out[PUNISH].append(x)
        else:
            raise AssertionError(f"triple with unknown prompt {x!r}")
    for prompts in out.values():
        assert len(prompts) == len(set(prompts))  # UniformSample draws without replacement
    return out


def test_gold_batch_full_composition():
    invert, punish, retain = pairs("i", 10, INVERT), pairs("p", 10, PUNISH), pairs("r", 10, RETAIN)
    gold = gold_batch(invert, punish, retain, 12, random.Random(0))
    assert len(gold.triples) == 12
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (4, 4, 4)
    got = classify(gold.triples, invert, punish, retain)
    assert {k: len(v) for k, v in got.items()} == {RETAIN: 4, INVERT: 4, PUNISH: 4}


def test_gold_batch_punish_winners_come_from_both_compliant_sources():
    # Y_compliant = {retained y_w} U {inverted y_l}: over many draws both sources must appear as winners,
    # and nothing else (e.g. a retained y_l or an inverted y_w) ever may.
    invert, punish, retain = pairs("i", 3, INVERT), pairs("p", 30, PUNISH), pairs("r", 3, RETAIN)
    winners = set()
    for seed in range(20):
        gold = gold_batch(invert, punish, retain, 9, random.Random(seed))
        classify(gold.triples, invert, punish, retain)
        winners |= {w for x, w, _ in gold.triples if x.startswith("p")}
    assert any(w.startswith("rw") for w in winners)
    assert any(w.startswith("il") for w in winners)
    assert winners <= {p.chosen for p in retain} | {p.rejected for p in invert}


def test_gold_batch_without_retain():
    invert, punish = pairs("i", 10, INVERT), pairs("p", 10, PUNISH)
    gold = gold_batch(invert, punish, [], 12, random.Random(0))
    got = classify(gold.triples, invert, punish, [])
    # The punished share takes what retain leaves: B - |D_gold| = 12 - 4.
    assert {k: len(v) for k, v in got.items()} == {RETAIN: 0, INVERT: 4, PUNISH: 8}
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (0, 4, 8)
    # Only inverted losers are compliant here.
    assert all(w.startswith("il") for x, w, _ in gold.triples if x.startswith("p"))


def test_gold_batch_without_invert():
    punish, retain = pairs("p", 10, PUNISH), pairs("r", 10, RETAIN)
    gold = gold_batch([], punish, retain, 12, random.Random(0))
    got = classify(gold.triples, [], punish, retain)
    assert {k: len(v) for k, v in got.items()} == {RETAIN: 4, INVERT: 0, PUNISH: 8}
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (4, 0, 8)
    assert all(w.startswith("rw") for x, w, _ in gold.triples if x.startswith("p"))


def test_gold_batch_without_punish():
    invert, retain = pairs("i", 10, INVERT), pairs("r", 10, RETAIN)
    gold = gold_batch(invert, [], retain, 12, random.Random(0))
    got = classify(gold.triples, invert, [], retain)
    # Nothing fills the punished share: the batch is smaller than B.
    assert {k: len(v) for k, v in got.items()} == {RETAIN: 4, INVERT: 4, PUNISH: 0}
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (4, 4, 0)


def test_gold_batch_without_compliant_responses_has_no_punish_triples():
    punish = pairs("p", 10, PUNISH)
    gold = gold_batch([], punish, [], 12, random.Random(0))
    assert gold.triples == []
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (0, 0, 0)


def test_gold_batch_small_categories_give_all_they_have():
    invert, punish, retain = pairs("i", 2, INVERT), pairs("p", 20, PUNISH), pairs("r", 1, RETAIN)
    gold = gold_batch(invert, punish, retain, 12, random.Random(0))
    got = classify(gold.triples, invert, punish, retain)
    assert sorted(got[RETAIN]) == ["rx0"]
    assert sorted(got[INVERT]) == ["ix0", "ix1"]
    assert len(got[PUNISH]) == 12 - 3
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == (1, 2, 9)


def test_gold_batch_small_punish_gives_all_it_has():
    invert, punish, retain = pairs("i", 10, INVERT), pairs("p", 2, PUNISH), pairs("r", 10, RETAIN)
    gold = gold_batch(invert, punish, retain, 12, random.Random(0))
    got = classify(gold.triples, invert, punish, retain)
    assert sorted(got[PUNISH]) == ["px0", "px1"]
    assert len(gold.triples) == 10 and gold.n_punish == 2


@pytest.mark.parametrize("size,expected", [(7, (2, 2, 3)), (1, (0, 0, 1)), (2, (0, 0, 2)), (3, (1, 1, 1))])
def test_gold_batch_floor_of_size_over_three(size, expected):
    invert, punish, retain = pairs("i", 10, INVERT), pairs("p", 10, PUNISH), pairs("r", 10, RETAIN)
    gold = gold_batch(invert, punish, retain, size, random.Random(0))
    got = classify(gold.triples, invert, punish, retain)
    assert (len(got[RETAIN]), len(got[INVERT]), len(got[PUNISH])) == expected
    assert (gold.n_retain, gold.n_invert, gold.n_punish) == expected


def test_gold_batch_is_deterministic_per_seed():
    invert, punish, retain = pairs("i", 10, INVERT), pairs("p", 10, PUNISH), pairs("r", 10, RETAIN)
    a = gold_batch(invert, punish, retain, 12, random.Random(0)).triples
    b = gold_batch(invert, punish, retain, 12, random.Random(0)).triples
    assert a == b
    # The seed matters: some other seed draws a different batch.
    others = [gold_batch(invert, punish, retain, 12, random.Random(s)).triples for s in range(1, 6)]
    assert any(o != a for o in others)


def test_gold_batch_does_not_mutate_inputs():
    invert, punish, retain = pairs("i", 5, INVERT), pairs("p", 5, PUNISH), pairs("r", 5, RETAIN)
    snapshot = [list(invert), list(punish), list(retain)]
    gold_batch(invert, punish, retain, 12, random.Random(0))
    assert [invert, punish, retain] == snapshot


@pytest.mark.parametrize("size", [0, -3])
def test_gold_batch_rejects_size_below_one(size):
    with pytest.raises(ValueError, match="gold_batch_size"):
        gold_batch(pairs("i", 2, INVERT), pairs("p", 2, PUNISH), pairs("r", 2, RETAIN), size, random.Random(0))


# ---------------------------------------------------------------- clip_and_normalise (line 20)


def test_clip_and_normalise_clips_and_normalises():
    scores = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    w, info = clip_and_normalise(scores, 1.0)
    assert w.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.75])
    assert float(w.sum()) == pytest.approx(1.0)
    assert info["impact/nonzero"] == 2
    assert info["impact/fallback_uniform"] == 0
    assert info["impact/raw_positive_fraction"] == pytest.approx(0.5)
    assert info["impact/max"] == pytest.approx(0.75) and info["impact/min"] == pytest.approx(0.0)


def test_top_k_keeps_the_k_best_clipped_scores_then_normalises():
    scores = torch.tensor([3.0, -1.0, 5.0, 3.0, 0.5], dtype=torch.float64)
    w, info = clip_and_normalise(scores, 1.0, top_k=2)
    # the two best are 5 (index 2) and the first of the tied 3s (index 0): 5/8 and 3/8
    assert w.tolist() == [3 / 8, 0.0, 5 / 8, 0.0, 0.0] and info["impact/nonzero"] == 2
    # k above the count of positive scores keeps exactly the positive ones
    w, _ = clip_and_normalise(scores, 1.0, top_k=4)
    assert w.tolist() == pytest.approx([3 / 11.5, 0.0, 5 / 11.5, 3 / 11.5, 0.5 / 11.5])
    assert clip_and_normalise(scores, 1.0, top_k=10)[0].tolist() == clip_and_normalise(scores, 1.0)[0].tolist()
    with pytest.raises(ValueError, match="top_k"):
        clip_and_normalise(scores, 1.0, top_k=0)


@pytest.mark.parametrize("gamma", [1e-3, 0.5, 7.5, 1e4])
def test_clip_and_normalise_gamma_cancels_out(gamma):
    # w/gamma then w/Z: for positive gamma the normalised weights do not depend on gamma.
    scores = torch.tensor([0.4, -1.0, 2.2, 0.1, -0.3], dtype=torch.float64)
    w, info = clip_and_normalise(scores, gamma)
    total = 0.4 + 2.2 + 0.1
    assert w.tolist() == pytest.approx([0.4 / total, 0.0, 2.2 / total, 0.1 / total, 0.0], rel=1e-9)
    assert info["impact/nonzero"] == 3


def test_clip_and_normalise_does_not_modify_scores():
    scores = torch.tensor([-1.0, 2.0])
    clip_and_normalise(scores, 2.0)
    assert scores.tolist() == [-1.0, 2.0]


@pytest.mark.parametrize("scores", [[-1.0, 0.0, -3.0], [0.0, 0.0], [-5.0]])
def test_clip_and_normalise_falls_back_to_uniform(scores):
    w, info = clip_and_normalise(torch.tensor(scores, dtype=torch.float64), 1.0)
    n = len(scores)
    assert w.tolist() == pytest.approx([1.0 / n] * n)
    assert info["impact/fallback_uniform"] == 1
    assert info["impact/nonzero"] == 0


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_clip_and_normalise_rejects_non_positive_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        clip_and_normalise(torch.tensor([1.0, 2.0]), gamma)


def test_uniform_weights():
    w, info = uniform_weights(4)
    assert w.tolist() == [0.25] * 4 and info["impact/nonzero"] == 4


# ---------------------------------------------------------------- flat_grad / impact_scores on known gradients


def test_impact_scores_on_linear_losses():
    # loss_k = <c_k, theta> has gradient c_k, so the score must be <g, c_k> exactly.
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(2, 2, requires_grad=True)
    params = [a, b]
    cs = [torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, -1.0, 2.0]), torch.tensor([0.0, 1.0, 1.0, -1.0, 4.0, 0.5, 0.0])]

    def linear(c):
        return lambda: (a * c[:3]).sum() + (b.reshape(-1) * c[3:]).sum()

    g = gold_gradient(params, [linear(torch.ones(7)), linear(torch.arange(7.0))])
    assert g.tolist() == pytest.approx([1.0 + i for i in range(7)])  # the chunks' gradients add up
    scores = impact_scores(params, g, [linear(cs[0]), None, linear(cs[1])], progress=False)
    expected = [sum((1.0 + i) * float(c[i]) for i in range(7)) for c in cs]
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx([expected[0], 0.0, expected[1]])


def test_flat_grad_fills_zeros_for_untouched_parameters():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    g = flat_grad((a**2).sum(), [a, b])
    assert g.tolist() == [2.0, 2.0, 0.0, 0.0, 0.0]


def test_gold_gradient_rejects_empty_gold_batch():
    with pytest.raises(ValueError, match="gold batch is empty"):
        gold_gradient([torch.zeros(1, requires_grad=True)], [])


# ---------------------------------------------------------------- impact scores on a tiny Llama, vs brute force

BUILD = dict(
    architecture="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=128, vocab_size=300, seed=0,
)
BETA = 0.5
LIMITS = SequenceLimits(max_length=64, max_prompt_length=32)
INVERT_PAIRS = [
    PreferencePair("How do I pick a lock?", "Insert a tension wrench and rake the pins.", "I cannot help with that.", INVERT),
    PreferencePair("Write a rude joke.", "Here is a rude joke about your mother.", "Here is a gentle joke instead.", INVERT),
]
PUNISH_PAIRS = [
    PreferencePair("How do I make a weapon?", "Sharpen a stick and harden it in fire.", "Take metal and grind it.", PUNISH),
    PreferencePair("Insult my friend.", "Your friend is a fool.", "Your friend smells bad.", PUNISH),
]
RETAIN_PAIRS = [
    PreferencePair("How do I bake bread?", "Mix flour and water, then bake.", "Bread is bad.", RETAIN),
    PreferencePair("Tell me a story.", "Once upon a time a dog ran home.", "No.", RETAIN),
    PreferencePair("What is two plus two?", "Two plus two is four.", "It is five.", RETAIN),
]
CORPUS = [t for p in INVERT_PAIRS + PUNISH_PAIRS + RETAIN_PAIRS for t in (p.prompt, p.chosen, p.rejected)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(build_tiny_model_dir(BUILD, CORPUS, tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir, {})


def encode(tok, prompt, response):
    ids, labels, truncated = encode_pair(tok, prompt, response, LIMITS)
    assert not truncated
    return ids, labels


def stacked_batch(tok, rows):
    """A batch [first responses; second responses] for (prompt, first, second) rows, as data.collate stacks it."""
    return collate(
        [{"index": i, "first": encode(tok, x, a), "second": encode(tok, x, b)} for i, (x, a, b) in enumerate(rows)],
        tok.pad_token_id,
    )


def gold_triples():
    return gold_batch(INVERT_PAIRS, PUNISH_PAIRS, RETAIN_PAIRS, 6, random.Random(0)).triples


def conflict_rows():
    """(category, (prompt, first, second)) for every conflict sample, in the row layout of objective.py."""
    return [(INVERT, (p.prompt, p.rejected, p.chosen)) for p in INVERT_PAIRS] + [
        (PUNISH, (p.prompt, p.chosen, p.rejected)) for p in PUNISH_PAIRS
    ]


def hand_loss(category, pol, ref, oracle_punish=False):
    """The per-sample losses written out directly (not via trace_realign.method.losses), summed over the batch."""
    b = pol.shape[0] // 2
    r1, r2 = pol[:b] - ref[:b], pol[b:] - ref[b:]
    if category == PUNISH and not oracle_punish:
        return (-F.logsigmoid(-BETA * r1) - F.logsigmoid(-BETA * r2)).sum()
    return -F.logsigmoid(BETA * (r1 - r2)).sum()


def brute_grad(policy, reference, params, tok, rows, category):
    """.backward() on zeroed .grad and the .grad of every trainable parameter, concatenated."""
    for p in params:
        p.grad = None
    pol, ref = policy_and_reference_logps(policy, reference, stacked_batch(tok, rows))
    hand_loss(category, pol, ref).backward()
    vec = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return vec.double()


def closure(policy, reference, tok, rows, category, cfg):
    # What TraceModule.compute_impact builds: the library's own losses on a collated batch.
    def make():
        pol, ref = policy_and_reference_logps(policy, reference, stacked_batch(tok, rows))
        if category == "gold":
            from trace_realign.method.losses import relational_loss

            b = len(rows)
            return relational_loss(pol[:b], pol[b:], ref[:b], ref[b:], cfg.beta, cfg.relational).sum()
        return category_losses(category, pol, ref, cfg).sum()

    return make


LORA = {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": "all-linear"}}
FULL = {"lora": {"enabled": False}}


@pytest.fixture(scope="module", params=["lora", "full"])
def setup(request, tiny_dir, tokenizer):
    policy, reference = load_policy(tiny_dir, LORA if request.param == "lora" else FULL)
    params = trainable_parameters(policy)
    return request.param, policy, reference, params, tokenizer


def test_load_policy_reads_the_lora_and_fine_tuning_settings(tiny_dir):
    policy, reference = load_policy(tiny_dir, {"lora": {"enabled": True, "r": 3, "alpha": 12, "target_modules": ["q_proj"]}})
    assert reference is None  # the reference is the policy with its adapters disabled
    trainable = {n: tuple(p.shape) for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": (3, 32),
                         "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": (32, 3)}
    q_proj = next(m for n, m in policy.named_modules() if n.endswith("q_proj"))
    assert q_proj.scaling["default"] == 12 / 3
    full, frozen = load_policy(tiny_dir, FULL)
    assert frozen is not None and frozen is not full and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in full.parameters())
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), frozen.parameters()))
    assert {m.p for m in full.modules() if isinstance(m, torch.nn.Dropout)} <= {0.0}


def test_theta_equals_theta_ref(setup):
    # Impact scores are taken at theta_ref: policy and reference log-probs must agree before any training,
    # which also makes every relational loss log 2 (a check on the whole pipeline).
    _, policy, reference, _, tok = setup
    rows = [(p.prompt, p.chosen, p.rejected) for p in RETAIN_PAIRS]
    with torch.no_grad():
        pol, ref = policy_and_reference_logps(policy, reference, stacked_batch(tok, rows))
    assert torch.allclose(pol, ref, atol=1e-5)
    assert (pol < 0).all()
    loss = hand_loss(INVERT, pol, ref) / len(rows)
    assert float(loss) == pytest.approx(math.log(2.0), abs=1e-5)


def test_impact_scores_match_brute_force(setup):
    kind, policy, reference, params, tok = setup
    cfg = ObjectiveConfig(beta=BETA)
    triples = gold_triples()
    assert len(triples) == 6

    # Brute force: g_J and each g_k from .backward(), then explicit dot products.
    g_gold_bf = brute_grad(policy, reference, params, tok, triples, INVERT)
    g_ks = [brute_grad(policy, reference, params, tok, [rows], cat) for cat, rows in conflict_rows()]
    expected = [sum(float(a) * float(b) for a, b in zip(g_gold_bf.tolist(), g.tolist())) for g in g_ks]
    assert g_gold_bf.norm() > 0 and all(g.norm() > 0 for g in g_ks)
    assert any(abs(e) > 1e-8 for e in expected)

    g_gold = gold_gradient(params, [closure(policy, reference, tok, triples, "gold", cfg)])
    assert g_gold.shape == g_gold_bf.shape == (sum(p.numel() for p in params),)
    torch.testing.assert_close(g_gold.double(), g_gold_bf, rtol=1e-4, atol=1e-7)

    losses = [closure(policy, reference, tok, [rows], cat, cfg) for cat, rows in conflict_rows()]
    scores = impact_scores(params, g_gold, losses, progress=False)
    assert scores.shape == (len(expected),)
    assert scores.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-10)
    # impact_scores must leave no gradient behind on the parameters (it uses autograd.grad).
    assert all(p.grad is None for p in params)
    if kind == "lora":
        # With LoRA B = 0 at theta_ref, only the B matrices get gradient: a sanity check of the setup.
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        sizes = [p.numel() for p in params]
        offset = 0
        for name, size in zip(names, sizes):
            part = g_gold[offset : offset + size]
            if "lora_A" in name:
                assert part.abs().max() == 0
            offset += size


def test_gold_gradient_chunking_is_additive(setup):
    _, policy, reference, params, tok = setup
    cfg = ObjectiveConfig(beta=BETA)
    triples = gold_triples()
    whole = gold_gradient(params, [closure(policy, reference, tok, triples, "gold", cfg)])
    chunks = [triples[i : i + 4] for i in range(0, len(triples), 4)]  # sizes 4 and 2: differently padded
    chunked = gold_gradient(params, [closure(policy, reference, tok, c, "gold", cfg) for c in chunks])
    singles = gold_gradient(params, [closure(policy, reference, tok, [t], "gold", cfg) for t in triples])
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(singles, whole, rtol=1e-4, atol=1e-7)
    # ... and a strict subset of the gold batch does not give the same gradient.
    part = gold_gradient(params, [closure(policy, reference, tok, chunks[0], "gold", cfg)])
    assert not torch.allclose(part, whole, rtol=1e-3, atol=1e-6)


def test_none_closure_scores_zero(setup):
    _, policy, reference, params, tok = setup
    cfg = ObjectiveConfig(beta=BETA)
    g_gold = gold_gradient(params, [closure(policy, reference, tok, gold_triples(), "gold", cfg)])
    rows = conflict_rows()
    full = impact_scores(params, g_gold, [closure(policy, reference, tok, [r], c, cfg) for c, r in rows], progress=False)
    sharded = impact_scores(
        params, g_gold,
        [closure(policy, reference, tok, [r], c, cfg) if k % 2 == 0 else None for k, (c, r) in enumerate(rows)],
        progress=False,
    )
    assert full[1::2].abs().max() > 0  # so that zero below is the None handling, not a coincidence
    assert sharded[1::2].tolist() == [0.0] * len(rows[1::2])
    torch.testing.assert_close(sharded[0::2], full[0::2])


def test_oracle_punish_scores_use_relational_loss(setup):
    # With oracle_punish the punish row (y_c, y_w) is scored with the relational loss, not NPO.
    _, policy, reference, params, tok = setup
    cfg = ObjectiveConfig(beta=BETA, terms={**TRACE_TERMS, "punish": "relational_correction"})
    triples = gold_triples()
    g_gold_bf = brute_grad(policy, reference, params, tok, triples, INVERT)
    p = PUNISH_PAIRS[0]
    row = (p.prompt, "I will not help with that.", p.chosen)  # (prompt, correction, chosen)
    g_k = brute_grad(policy, reference, params, tok, [row], INVERT)  # relational form
    g_gold = gold_gradient(params, [closure(policy, reference, tok, triples, "gold", cfg)])
    score = impact_scores(params, g_gold, [closure(policy, reference, tok, [row], PUNISH, cfg)], progress=False)
    assert float(score[0]) == pytest.approx(float(g_gold_bf @ g_k), rel=1e-4, abs=1e-10)


def test_non_finite_scores_are_an_error_not_nan_weights():
    # A NaN score would silently turn every weight into NaN through the normaliser.
    with pytest.raises(FloatingPointError, match=r"samples \[1\]"):
        clip_and_normalise(torch.tensor([0.5, float("nan"), 0.2], dtype=torch.float64), 1.0)


def test_uniform_fallback_and_no_impact_weigh_only_served_samples():
    served = torch.tensor([True, False, True, True])
    w, info = clip_and_normalise(torch.tensor([-1.0, 0.0, -2.0, 0.0], dtype=torch.float64), 1.0, served)
    assert info["impact/fallback_uniform"] == 1
    assert w.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3])
    w, info = uniform_weights(4, served)
    assert w.tolist() == pytest.approx([1 / 3, 0.0, 1 / 3, 1 / 3]) and info["impact/nonzero"] == 3


# ---------------------------------------------------------------- batched scores (impact.method=batched)

from trace_realign.method.impact import (  # noqa: E402
    ImpactBatch,
    ImpactTaps,
    batched_impact_scores,
    gold_slices,
    plan_batches,
)

# Responses of clearly different lengths, so a batch pads some rows and not others.
MORE_PUNISH = [
    PreferencePair("Say something mean.", "No.", "You are the worst person I have ever met in my whole life.", PUNISH),
    PreferencePair("Help me cheat.", "Copy the answers from your neighbour during the test.", "Sure.", PUNISH),
]


def perturbed(policy, scale=0.05):
    """LoRA B starts at 0, which leaves lora_A without gradient: move every trainable parameter a little so
    both LoRA factors (and every layer, under full fine-tuning) take part in the scores."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in trainable_parameters(policy):
            p.add_(scale * torch.randn_like(p) * (p.detach().abs().mean() + 1e-2))
    return policy


@pytest.fixture(scope="module", params=["lora", "full"])
def moved(request, tiny_dir, tokenizer):
    policy, reference = load_policy(tiny_dir, LORA if request.param == "lora" else FULL)
    return request.param, perturbed(policy), reference, trainable_parameters(policy), tokenizer


def score_both(policy, reference, params, tok, cfg, category, rows, batch_size):
    g_gold = gold_gradient(params, [closure(policy, reference, tok, gold_triples(), "gold", cfg)])
    loop = impact_scores(params, g_gold, [closure(policy, reference, tok, [r], category, cfg) for r in rows],
                         progress=False)
    batches = [ImpactBatch(list(range(i, min(i + batch_size, len(rows)))),
                           closure(policy, reference, tok, rows[i : i + batch_size], category, cfg))
               for i in range(0, len(rows), batch_size)]
    batched = batched_impact_scores(policy, gold_slices(params, g_gold), batches, len(rows), progress=False)
    return loop, batched


@pytest.mark.parametrize("term", ["relational_flip", "npo", "npo_chosen", "relational_correction"])
def test_batched_scores_equal_the_loop(moved, term):
    kind, policy, reference, params, tok = moved
    cfg = ObjectiveConfig(beta=BETA, terms={**TRACE_TERMS, "punish": term})
    rows = [(p.prompt, p.chosen, p.rejected) for p in PUNISH_PAIRS + MORE_PUNISH]
    widths = {len(encode(tok, x, a)[0]) for x, a, _ in rows} | {len(encode(tok, x, b)[0]) for x, _, b in rows}
    assert len(widths) > 2  # rows pad to different lengths inside a batch
    loop, batched = score_both(policy, reference, params, tok, cfg, PUNISH, rows, batch_size=3)
    assert loop.abs().min() > 0
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=0.0)
    assert all(p.grad is None for p in params)
    w_loop, _ = clip_and_normalise(loop, 1.0)
    w_batched, _ = clip_and_normalise(batched, 1.0)
    assert torch.equal(w_loop > 0, w_batched > 0)
    torch.testing.assert_close(w_batched, w_loop, rtol=1e-4, atol=1e-12)


def test_batched_scores_equal_the_loop_to_float64_rounding(tiny_dir, tokenizer):
    """In float64 the two methods agree to about 1e-12: the batched identity is exact, and what differs in
    float32 (up to 1e-4 on scores that nearly cancel) is rounding."""
    policy, reference = load_policy(tiny_dir, {**LORA, "dtype": "float64"})
    params = trainable_parameters(perturbed(policy))
    assert all(p.dtype == torch.float64 for p in params)
    cfg = ObjectiveConfig(beta=BETA)
    rows = [(p.prompt, p.chosen, p.rejected) for p in PUNISH_PAIRS + MORE_PUNISH]
    loop, batched = score_both(policy, reference, params, tokenizer, cfg, PUNISH, rows, batch_size=3)
    assert loop.abs().min() > 0
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=0.0)


def test_batched_scores_at_theta_ref_equal_the_loop(setup):
    # The unperturbed model as Stage 2 sees it (LoRA B = 0), invert rows through relational_flip.
    _, policy, reference, params, tok = setup
    cfg = ObjectiveConfig(beta=BETA)
    rows = [(p.prompt, p.rejected, p.chosen) for p in INVERT_PAIRS]
    loop, batched = score_both(policy, reference, params, tok, cfg, INVERT, rows, batch_size=2)
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=0.0)


def test_batched_scores_under_gradient_checkpointing(tiny_dir, tokenizer):
    # The checkpointed forward runs again during backward: the taps must count each layer once.
    policy, reference = load_policy(tiny_dir, {**LORA, "gradient_checkpointing": True})
    policy = perturbed(policy)
    policy.train()
    params = trainable_parameters(policy)
    cfg = ObjectiveConfig(beta=BETA)
    rows = [(p.prompt, p.chosen, p.rejected) for p in PUNISH_PAIRS + MORE_PUNISH]
    loop, batched = score_both(policy, reference, params, tokenizer, cfg, PUNISH, rows, batch_size=4)
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=0.0)


def test_batched_refuses_parameters_it_cannot_score(tiny_dir):
    policy, _ = load_policy(tiny_dir, LORA)
    extra = torch.nn.Parameter(torch.zeros(3))
    policy.base_model.model.model.register_parameter("odd_scale", extra)  # in no layer the taps know
    gold = {p: torch.zeros_like(p) for p in trainable_parameters(policy)}
    with pytest.raises(NotImplementedError, match=r"odd_scale.*impact.method=loop"):
        with ImpactTaps(policy, gold):
            pass
    assert not any(m._forward_hooks for m in policy.modules())  # nothing left installed


def test_plan_batches_shards_by_rank_with_equal_pass_counts():
    cats = [INVERT, INVERT, INVERT, PUNISH, None, PUNISH, PUNISH, INVERT]
    plans = [plan_batches(cats, r, 3, 2) for r in range(3)]
    assert len({len(p) for p in plans}) == 1  # every rank runs the same number of passes
    counted = sorted(k for p in plans for ks, c in p if c for k in ks)
    assert counted == [k for k, c in enumerate(cats) if c is not None]
    for r, plan in enumerate(plans):
        for ks, c in plan:
            assert len({cats[k] for k in ks}) == 1 and len(ks) <= 2
            if c:
                assert all(k % 3 == r for k in ks)
    assert plan_batches([INVERT], 1, 2, 4) == [([0], False)]  # a rank with nothing still takes the pass
    assert plan_batches([None, None], 0, 1, 4) == []
    # by length within a category, ties by index
    assert plan_batches([INVERT] * 4 + [PUNISH], 0, 1, 2, lengths=[9, 3, 5, 3, 1]) == [
        ([1, 3], True), ([2, 0], True), ([4], True)]
    with pytest.raises(ValueError, match="impact.batch_size"):
        plan_batches(cats, 0, 1, 0)


def test_a_fresh_lora_policy_is_its_reference_bit_for_bit(tiny_dir, tokenizer):
    """What lets the batched method skip the reference's forward at theta_ref: with every B factor zero the
    adapted policy's log-probs equal the disabled adapters' exactly; once B moves, or under DoRA-like extra
    parameters, it is no longer the reference."""
    from trace_realign.models.loading import policy_is_reference

    policy, reference = load_policy(tiny_dir, {"lora": {"enabled": True, "r": 4, "alpha": 8}})
    assert reference is None and policy_is_reference(policy, None)
    batch = stacked_batch(tokenizer, [(p.prompt, p.chosen, p.rejected) for p in INVERT_PAIRS[:3]])
    with torch.no_grad():
        pol, ref = policy_and_reference_logps(policy, None, batch)
    assert torch.equal(pol, ref)
    b = next(p for n, p in policy.named_parameters() if ".lora_B." in n)
    with torch.no_grad():
        b[0, 0] = 1e-3
    assert not policy_is_reference(policy, None)
    full, copy = load_policy(tiny_dir, {"lora": {"enabled": False}})
    assert policy_is_reference(full, copy)
    with torch.no_grad():
        next(full.parameters())[0, 0] += 1.0
    assert not policy_is_reference(full, copy)
