"""The training step's hybrid objective (Algorithm 1, lines 24-28) on a model whose log-probabilities are
written out by hand: which rows each term reads, the impact weight of each conflict sample (by its index),
the mean / sum reductions, alpha_KL, and the terms a table swaps in."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from trace_realign.core.records import INVERT, PUNISH, RETAIN
from trace_realign.core.sequences import IGNORE_INDEX
from trace_realign.method.datamodule import collate
from trace_realign.method.module import TraceModule
from trace_realign.method.objective import TRACE_TERMS, ObjectiveConfig

VOCAB, PAD = 7, 6
# The step logs through self.log, which says it has no trainer to log to: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


class Bigram(nn.Module):
    """A 'language model' whose next-token logits depend on the current token only: a seeded table."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]  # as transformers' models: the last logits_to_keep columns (0: all)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class Plain(Bigram):
    """A forward that takes no logits_to_keep (remote code, say): every column's logits."""

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return super().forward(input_ids, attention_mask, use_cache)


def seq(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def by_hand_logp(table: torch.Tensor, ids: list[int], labels: list[int]) -> float:
    """sum over response positions t of log softmax(table[ids[t-1]])[ids[t]], with plain floats."""
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] == IGNORE_INDEX:
            continue
        row = [float(x) for x in table[ids[t - 1]]]
        total += row[ids[t]] - math.log(sum(math.exp(x) for x in row))
    return total


def by_hand_kl(ref: torch.Tensor, pol: torch.Tensor, ids: list[int], labels: list[int]) -> float:
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] == IGNORE_INDEX:
            continue
        r = [float(x) for x in ref[ids[t - 1]]]
        p = [float(x) for x in pol[ids[t - 1]]]
        zr, zp = math.log(sum(math.exp(x) for x in r)), math.log(sum(math.exp(x) for x in p))
        total += sum(math.exp(a - zr) * ((a - zr) - (b - zp)) for a, b in zip(r, p))
    return total


def log_sigmoid(z: float) -> float:
    return -math.log(1.0 + math.exp(-z))


# Conflict samples 0-2 invert, 3-4 punish (the weight vector's layout); the batches serve them out of order.
INVERT_ROWS = {2: (seq([1, 2], [3, 4]), seq([1, 2], [5, 0, 3])), 0: (seq([4], [1, 1, 2]), seq([4], [0, 5]))}
PUNISH_ROWS = {4: (seq([2, 3, 1], [0, 4]), seq([2, 3, 1], [5]))}
RETAIN_ROWS = {1: (seq([0], [2, 3, 4]),), 0: (seq([5, 5], [1]), )}
RETAIN_PAIRS = {1: (seq([0], [2, 3, 4]), seq([0], [4])), 0: (seq([5, 5], [1]), seq([5, 5], [2, 0]))}
WEIGHTS = [0.1, 0.0, 0.4, 0.2, 0.3]  # sums to 1 over the conflict set, none equal where it matters


def batch(rows: dict) -> dict:
    return collate([{"index": i, "first": r[0], **({"second": r[1]} if len(r) > 1 else {})} for i, r in rows.items()],
                   PAD)


def module(objective: ObjectiveConfig) -> TraceModule:
    m = TraceModule(model_path="unused", model_cfg={}, objective=objective, optimizer=None)
    m.policy, m.reference = Bigram(0), Bigram(1)
    m.reference.requires_grad_(False)
    m.weights = torch.tensor(WEIGHTS)
    return m


def pair_logratios(m: TraceModule, rows: dict) -> list[tuple[float, float]]:
    pol, ref = m.policy.table.detach(), m.reference.table
    return [tuple(by_hand_logp(pol, *r) - by_hand_logp(ref, *r) for r in pair) for pair in rows.values()]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("relational", ["sigmoid", "ipo"])
def test_training_step_is_the_weighted_hybrid_objective(reduction, relational):
    beta, alpha = 0.7, 0.3
    m = module(ObjectiveConfig(beta=beta, relational=relational, alpha_kl=alpha, reduction=reduction))
    loss = m.training_step({INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS), RETAIN: batch(RETAIN_ROWS)}, 0)

    def relational_loss(d: float) -> float:
        return -log_sigmoid(beta * d) if relational == "sigmoid" else (d - 1 / (2 * beta)) ** 2

    inv = [relational_loss(a - b) for a, b in pair_logratios(m, INVERT_ROWS)]  # first row over second
    pun = [-log_sigmoid(-beta * a) - log_sigmoid(-beta * b) for a, b in pair_logratios(m, PUNISH_ROWS)]
    kl = [by_hand_kl(m.reference.table, m.policy.table.detach(), *r[0]) for r in RETAIN_ROWS.values()]
    assert min(kl) > 0 and len(set(inv)) == 2
    w_inv = [WEIGHTS[k] for k in INVERT_ROWS]  # by each sample's index, not its place in the batch
    w_pun = [WEIGHTS[k] for k in PUNISH_ROWS]
    if reduction == "sum":  # Algorithm 1 as written: sum_i w_i l_i, sum of the KL
        expected = {"invert": sum(w * x for w, x in zip(w_inv, inv)), "punish": sum(w * x for w, x in zip(w_pun, pun)),
                    "kl": sum(kl)}
    else:  # batch means of |D_conflict| w_i l_i and of the KL
        n = len(WEIGHTS)
        expected = {"invert": sum(n * w * x for w, x in zip(w_inv, inv)) / len(inv),
                    "punish": sum(n * w * x for w, x in zip(w_pun, pun)) / len(pun), "kl": sum(kl) / len(kl)}
    got = m.last_losses
    assert got["train/loss_invert"] == pytest.approx(expected["invert"], rel=1e-5)
    assert got["train/loss_punish"] == pytest.approx(expected["punish"], rel=1e-5)
    assert got["train/loss_kl"] == pytest.approx(expected["kl"], rel=1e-5)
    assert got["train/loss_retain"] == 0.0
    total = expected["invert"] + expected["punish"] + alpha * expected["kl"]
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5) and got["train/loss"] == pytest.approx(total, rel=1e-5)
    assert m.first_losses == {k.replace("train/", "train/first_"): v for k, v in got.items()}
    loss.backward()
    assert m.policy.table.grad.abs().sum() > 0 and m.reference.table.grad is None


def test_alpha_kl_zero_logs_the_kl_without_training_on_it():
    m = module(ObjectiveConfig(beta=0.5, alpha_kl=0.0))
    loss = m.training_step({INVERT: batch(INVERT_ROWS), RETAIN: batch(RETAIN_ROWS)}, 0)
    got = m.last_losses
    assert got["train/loss_kl"] > 0 and got["train/loss_punish"] == 0.0
    assert float(loss.detach()) == pytest.approx(got["train/loss_invert"], rel=1e-6)
    # the KL alone gives no gradient: a step on the retained batch only moves nothing
    loss = m.training_step({RETAIN: batch(RETAIN_ROWS)}, 1)
    assert not loss.requires_grad and float(loss) == 0.0
    # and the first losses stay those of the first step
    assert m.first_losses["train/first_loss_invert"] == got["train/loss_invert"]


def test_terms_the_table_swaps_in_for_retained_pairs_carry_no_impact_weight():
    # DPO on retained pairs (relational, chosen over rejected) and SFT (nll): plain batch means, unweighted.
    m = module(ObjectiveConfig(beta=0.5, terms={INVERT: None, PUNISH: None, RETAIN: "relational"}))
    m.training_step({RETAIN: batch(RETAIN_PAIRS)}, 0)
    dpo = [-log_sigmoid(0.5 * (a - b)) for a, b in pair_logratios(m, RETAIN_PAIRS)]
    assert m.last_losses["train/loss_retain"] == pytest.approx(sum(dpo) / len(dpo), rel=1e-5)
    assert m.last_losses["train/loss"] == pytest.approx(sum(dpo) / len(dpo), rel=1e-5)

    m = module(ObjectiveConfig(terms={INVERT: None, PUNISH: None, RETAIN: "nll"}))
    m.training_step({RETAIN: batch(RETAIN_ROWS)}, 0)
    per_token = [-by_hand_logp(m.policy.table.detach(), *r[0]) / sum(x != IGNORE_INDEX for x in r[0][1])
                 for r in RETAIN_ROWS.values()]
    assert m.last_losses["train/loss_retain"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)


def test_oracle_punish_prefers_the_correction_row():
    m = module(ObjectiveConfig(beta=0.5, terms={**TRACE_TERMS, PUNISH: "relational_correction"}))
    m.training_step({PUNISH: batch(PUNISH_ROWS)}, 0)
    (a, b), = pair_logratios(m, PUNISH_ROWS)
    n = len(WEIGHTS)
    assert m.last_losses["train/loss_punish"] == pytest.approx(n * WEIGHTS[4] * -log_sigmoid(0.5 * (a - b)), rel=1e-5)


class Counting(Bigram):
    """A Bigram counting its forward passes and the rows they carried."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.calls: list[int] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        self.calls.append(len(input_ids))
        return super().forward(input_ids, attention_mask, use_cache, logits_to_keep)


def test_a_fused_step_runs_one_policy_forward_and_at_most_one_reference_forward_over_every_category():
    m = module(ObjectiveConfig(beta=0.5, alpha_kl=0.2, fused_forward=True))
    m.policy, m.reference = Counting(0), Counting(1)
    m.reference.requires_grad_(False)
    parts = {INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS), RETAIN: batch(RETAIN_ROWS)}
    first = m.training_step(parts, 0)
    rows = 2 * len(INVERT_ROWS) + 2 * len(PUNISH_ROWS) + len(RETAIN_ROWS)
    assert m.policy.calls == [rows] and m.reference.calls == [rows]
    # cached log pi_ref: the reference runs on the KL's rows alone
    again = m.training_step(parts, 1)
    assert m.policy.calls == [rows, rows] and m.reference.calls == [rows, len(RETAIN_ROWS)]
    assert float(again.detach()) == pytest.approx(float(first.detach()), rel=1e-12)  # the cached values are the computed ones
    # no KL term and everything cached: no reference forward at all
    m.training_step({INVERT: parts[INVERT], PUNISH: parts[PUNISH]}, 2)
    assert m.reference.calls == [rows, len(RETAIN_ROWS)] and m.policy.calls[-1] == rows - len(RETAIN_ROWS)


def test_fused_logits_of_right_padded_batches_are_each_batchs_own():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_realign.method.objective import forward_logits, fused_logits

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    rows = [[seq([5, 6, 7], [8, 9]), seq([5], [10, 11, 12, 13, 14])], [seq([3, 4], [1])],
            [seq([9, 9, 9, 9], [2, 2, 2]), seq([1], [3])]]
    parts = [collate([{"index": i, "first": r} for i, r in enumerate(b)], 0) for b in rows]
    widths = {p["input_ids"].shape[1] for p in parts}
    assert len(widths) == 3  # each batch its own width: the fused batch pads two of them further
    with torch.no_grad():
        fused = fused_logits(model, parts)
        for part, logits in zip(parts, fused):
            alone = forward_logits(model, part)
            assert logits.shape == alone.shape
            # the columns from the one before the batch's first response token (3, 2 and 1 prompt tokens)
            assert logits.shape[1] == part["input_ids"].shape[1] - min(part["labels"].ne(IGNORE_INDEX).int().argmax(1)) + 1
            keep = part["attention_mask"][:, -logits.shape[1]:].bool()  # after a row's end: padding in both
            assert torch.allclose(logits[keep], alone[keep], atol=1e-5)


def test_the_scored_columns_logits_give_every_term_the_numbers_of_all_columns_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_realign.core.sequences import sequence_logps
    from trace_realign.method.objective import forward_logits, kl_from_logits, scored_width

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    policy, reference = LlamaForCausalLM(config).double().eval(), LlamaForCausalLM(config).double().eval()
    part = collate([{"index": i, "first": r} for i, r in enumerate([seq([5, 6, 7, 4], [8, 9]), seq([5, 3, 2], [10, 11, 12])])], 0)
    assert scored_width(part["labels"]) == part["input_ids"].shape[1] - 2  # from the column before "10"
    with torch.no_grad():
        full = {name: m(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits
                for name, m in (("policy", policy), ("reference", reference))}
        kept = {"policy": forward_logits(policy, part), "reference": forward_logits(reference, part)}
    assert kept["policy"].shape[1] == scored_width(part["labels"]) < full["policy"].shape[1]
    for name in full:
        assert torch.allclose(sequence_logps(kept[name], part["labels"]), sequence_logps(full[name], part["labels"]),
                              rtol=0, atol=1e-12)
    assert torch.allclose(kl_from_logits(kept["reference"], kept["policy"], part["labels"]),
                          kl_from_logits(full["reference"], full["policy"], part["labels"]), rtol=0, atol=1e-12)
    no_response = dict(part, labels=torch.full_like(part["labels"], IGNORE_INDEX))
    assert scored_width(no_response["labels"]) == part["input_ids"].shape[1]  # nothing scored: every column


def test_a_model_without_logits_to_keep_gives_every_columns_logits():
    from trace_realign.core.sequences import sequence_logps
    from trace_realign.method.objective import forward_logits

    class Counted(Plain):
        calls = 0

        def __call__(self, *args, **kwargs):
            type(self).calls += 1
            return super().__call__(*args, **kwargs)

    part = batch(PUNISH_ROWS)
    model = Counted(0)
    logits = forward_logits(model, part)
    assert logits.shape[1] == part["input_ids"].shape[1]
    assert torch.equal(sequence_logps(logits, part["labels"]), sequence_logps(forward_logits(Bigram(0), part), part["labels"]))
    # the refusal is remembered per model: later calls make one forward each, not two
    assert Counted.calls == 2
    forward_logits(model, part)
    assert Counted.calls == 3
    assert forward_logits(Bigram(0), part).shape[1] < part["input_ids"].shape[1]  # another model still keeps columns


def test_fused_logits_of_a_model_without_logits_to_keep_are_each_batchs_own_columns():
    # such a model gives every column; each batch's slice must still start at its own scored columns
    from trace_realign.core.sequences import sequence_logps
    from trace_realign.method.objective import fused_logits

    # every prompt at least 3 tokens long, so the fused batch's first scored column is not its first column
    retain = {1: (seq([0, 3, 3, 1], [2, 3, 4]),), 0: (seq([5, 5, 2, 2, 1], [1]),)}
    parts = [batch(PUNISH_ROWS), batch(retain)]
    assert min(p["labels"].ne(IGNORE_INDEX).int().argmax(1).min() for p in parts) >= 3
    for model in (Plain(0), Bigram(0)):
        fused = [sequence_logps(lg, p["labels"]) for p, lg in zip(parts, fused_logits(model, parts))]
        alone = [sequence_logps(lg, p["labels"]) for p, lg in zip(parts, fused_logits(model, parts, fused=False))]
        for f, a in zip(fused, alone):
            assert torch.allclose(f, a, rtol=0, atol=1e-12)


def test_a_fused_step_with_cached_reference_log_probs_matches_one_pass_per_category():
    # the reference then fuses the KL's rows alone, the policy every category's: each batch's logits must
    # still be its own columns, whatever the other batches' prompts (here the retained prompts are longest)
    retain = {1: (seq([0, 3, 3, 1], [2, 3, 4]),), 0: (seq([5, 5, 2, 2, 1], [1]),)}
    parts = {INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS), RETAIN: batch(retain)}
    losses = {}
    for fused in (True, False):
        m = module(ObjectiveConfig(beta=0.5, alpha_kl=0.2, fused_forward=fused))
        m.policy, m.reference = Counting(0), Counting(1)
        m.reference.requires_grad_(False)
        losses[fused] = [float(m.training_step(parts, step).detach()) for step in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)


def test_trainable_state_and_checkpoint_keys_use_the_unwrapped_names():
    """FSDP1 (and activation checkpointing) wrap the decoder layers in place, so the policy's own parameter
    names gain wrapper segments; what is saved, gathered and loaded back is named as in the bare model."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from trace_realign.models.loading import load_trainable

    def lora_llama():
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2))
        return get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    m = module(ObjectiveConfig())
    m.policy = lora_llama()
    apply_activation_checkpointing(m.policy, check_fn=lambda mod: isinstance(mod, LlamaDecoderLayer))
    assert any("_checkpoint_wrapped_module." in n for n, _ in m.policy.named_parameters())
    state = m.trainable_state()
    bare = lora_llama()
    assert set(state) == {n for n, p in bare.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in bare.parameters():
            p.zero_()
    load_trainable(bare, state)
    assert torch.equal(dict(bare.named_parameters())[next(iter(state))], next(iter(state.values())))
    assert {k for k in m.checkpoint_keys() if k != "weights"} == {f"policy.{n}" for n in state}


def test_unfused_forward_runs_one_pass_per_category_with_the_same_losses():
    parts = {INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS), RETAIN: batch(RETAIN_ROWS)}
    losses = {}
    for fused in (True, False, "auto"):  # auto: on a CPU, one pass per category
        m = module(ObjectiveConfig(beta=0.5, alpha_kl=0.2, fused_forward=fused))
        m.policy, m.reference = Counting(0), Counting(1)
        m.reference.requires_grad_(False)
        m.training_step(parts, 0)
        losses[fused] = m.last_losses
        per_category = [2 * len(INVERT_ROWS), 2 * len(PUNISH_ROWS), len(RETAIN_ROWS)]
        assert m.policy.calls == ([sum(per_category)] if fused is True else per_category)
        assert m.reference.calls == ([sum(per_category)] if fused is True else per_category)
    assert losses[True] == pytest.approx(losses[False], rel=1e-12) and losses["auto"] == losses[False]


def test_a_step_reports_the_log_probabilities_of_every_response_it_trains():
    from trace_realign.method.objective import ReferenceCache, sequence_logps, step_terms

    parts = {INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS), RETAIN: batch(RETAIN_ROWS)}
    policy, reference = Counting(0), Counting(1)
    logps: dict[str, torch.Tensor] = {}
    step_terms(policy, reference, parts, ObjectiveConfig(beta=0.5, alpha_kl=0.2), ReferenceCache(), None, logps)
    assert sorted(logps) == ["invert/chosen", "invert/chosen/ratio", "invert/rejected", "invert/rejected/ratio",
                             "punish/chosen", "punish/chosen/ratio", "punish/rejected", "punish/rejected/ratio",
                             "retain/chosen"]
    with torch.no_grad():
        inv = parts[INVERT]
        pol = sequence_logps(policy(inv["input_ids"], inv["attention_mask"]).logits, inv["labels"])
        ref = sequence_logps(reference(inv["input_ids"], inv["attention_mask"]).logits, inv["labels"])
    n = len(INVERT_ROWS)  # relational_flip serves the old rejected first
    assert logps["invert/rejected"].item() == pytest.approx(pol[:n].mean().item())
    assert logps["invert/chosen/ratio"].item() == pytest.approx((pol[n:] - ref[n:]).mean().item())
    assert not any(v.requires_grad for v in logps.values())
    # the retained rows' log pi(y) comes from the KL's own log-softmax: the same number, the same KL
    with torch.no_grad():
        ret = parts[RETAIN]
        kept = sequence_logps(policy(ret["input_ids"], ret["attention_mask"]).logits, ret["labels"])
    assert logps["retain/chosen"].item() == pytest.approx(kept.mean().item())
    plain = step_terms(policy, reference, parts, ObjectiveConfig(beta=0.5, alpha_kl=0.2), ReferenceCache(), None)
    logged = step_terms(policy, reference, parts, ObjectiveConfig(beta=0.5, alpha_kl=0.2), ReferenceCache(), None, {})
    assert torch.allclose(plain[RETAIN], logged[RETAIN], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="objective.fused_forward"):
        ObjectiveConfig(fused_forward="sometimes")


def test_the_nll_term_adds_the_winners_token_nll_to_its_categorys_per_sample_loss():
    from trace_realign.method.objective import ReferenceCache, sequence_logps, step_terms

    parts = {INVERT: batch(INVERT_ROWS), PUNISH: batch(PUNISH_ROWS)}
    policy, reference = Counting(0), Counting(1)
    plain = step_terms(policy, reference, parts, ObjectiveConfig(beta=0.5), ReferenceCache())
    rpo = step_terms(policy, reference, parts, ObjectiveConfig(beta=0.5, nll_weight=2.0, nll_categories=("invert",)),
                     ReferenceCache())
    inv = parts[INVERT]
    n = len(INVERT_ROWS)
    with torch.no_grad():
        winner = sequence_logps(policy(inv["input_ids"], inv["attention_mask"]).logits, inv["labels"])[:n]
    tokens = (inv["labels"][:n, 1:] != -100).sum(-1)
    assert torch.allclose(rpo[INVERT].detach(), plain[INVERT].detach() - 2.0 * winner / tokens)
    assert torch.equal(rpo[PUNISH].detach(), plain[PUNISH].detach())  # only the categories named
