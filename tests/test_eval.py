"""Evaluation: TPA per group and utility, from judged generations."""

from __future__ import annotations

import math

import pytest
import torch

from trace_realign.eval import TPA, JudgeFailed, Utility, agreement, percent_with_ci, verdict, wilson_interval
from trace_realign.oracle.base import Oracle, Policy

POLICY = Policy(name="p", text="")


class Table(Oracle):
    """Judges by a lookup of the response text; unknown text is undecided."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def judge(self, prompt, response, policy):
        return self.verdicts.get(response)


def test_agreement_overall_and_per_group():
    items = [
        {"prompt": "a", "axis": "medical", "category": "invert", "shift": "shifted"},
        {"prompt": "b", "axis": "medical", "category": "invert", "shift": "shifted"},
        {"prompt": "c", "axis": "privacy", "category": "retain", "shift": "unchanged"},
        {"prompt": "d", "axis": "risky", "category": "retain", "shift": "unchanged"},
        {"prompt": "e", "axis": "risky", "category": "retain", "shift": "unchanged"},
    ]
    oracle = Table({"yes": True, "no": False})
    out, verdicts = agreement(oracle, POLICY, items, ["yes", "no", "yes", "???", "no"])
    assert verdicts == [True, False, True, None, False]
    # an undecided verdict is no verdict: left out of every percentage, and counted
    assert out["/undecided"] == 1.0
    assert out[""] == pytest.approx(50.0)  # 2 of the 4 decided
    assert out["/medical"] == pytest.approx(50.0)
    assert out["/invert"] == pytest.approx(50.0) and out["/shifted"] == pytest.approx(50.0)
    assert out["/privacy"] == 100.0 and out["/risky"] == 0.0  # d is undecided, e is not
    assert out["/retain"] == pytest.approx(50.0) and out["/unchanged"] == pytest.approx(50.0)
    assert out["_ci95"] == pytest.approx(50 * (wilson_interval(2, 4)[1] - wilson_interval(2, 4)[0]))
    assert out["_ci95/privacy"] == pytest.approx(50 * (wilson_interval(1, 1)[1] - wilson_interval(1, 1)[0]))


def test_wilson_interval_against_hand_values():
    # 50 of 100: centre 0.5, half-width z/(1 + z^2/n) * sqrt(1/400 + z^2/40000)
    lo, hi = wilson_interval(50, 100)
    z = 1.959963984540054
    half = z / (1 + z * z / 100) * math.sqrt(0.25 / 100 + z * z / 40000)
    assert (lo, hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert hi - lo == pytest.approx(0.1925, abs=1e-3)  # the textbook +-9.6 points at n = 100
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-3)  # never the empty interval of the normal approximation
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert percent_with_ci([True] * 3 + [False])[0] == 75.0


def test_verdict_says_whether_realignment_happened_and_at_what_cost():
    metrics = {"eval/before/tpa/shifted": 0.0, "eval/before/tpa_ci95/shifted": 0.5,
               "eval/after/tpa/shifted": 62.0, "eval/after/tpa_ci95/shifted": 4.7,
               "eval/before/tpa/unchanged": 100.0, "eval/after/tpa/unchanged": 94.0,
               "eval/before/utility": 100.0, "eval/after/utility": 99.0}
    lines = verdict(metrics)
    # the table: before, then after, each with its interval where there is one, and the change
    assert lines[1].split() == ["TPA,", "shifted", "axes", "0.0", "±", "0.5", "62.0", "±", "4.7", "+62.0"]
    assert lines[2].split() == ["TPA,", "unchanged", "axes", "100.0", "94.0", "-6.0"]
    assert lines[3].split() == ["utility", "100.0", "99.0", "-1.0"]
    assert len(lines) == 5
    assert lines[4] == ("  verdict: realigned: TPA on the shifted axes rose from 0.0 to 62.0 (the 95 % intervals do "
                        "not overlap); unchanged axes fell by 6.0 points, utility kept (-1.0)")
    metrics["eval/after/tpa/shifted"] = 4.0
    assert "verdict: not shown to realign: TPA on the shifted axes rose from 0.0 to 4.0" in "\n".join(verdict(metrics))
    metrics["eval/after/tpa/shifted"] = 5.2  # 5.2 - 4.7 = 0.5: the intervals touch, they do not part
    assert "not shown to realign" in "\n".join(verdict(metrics))
    metrics["eval/after/tpa/shifted"] = 5.3
    assert "verdict: realigned:" in "\n".join(verdict(metrics))
    metrics["eval/after/tpa/shifted"] = 0.0
    assert "verdict: not realigned: TPA on the shifted axes went from 0.0 to 0.0" in "\n".join(verdict(metrics))
    # within the 2-point tolerance a cost is "kept", beyond it a fall
    metrics["eval/after/utility"], metrics["eval/after/tpa/unchanged"] = 98.0, 97.9
    text = "\n".join(verdict(metrics))
    assert "utility kept (-2.0)" in text and "unchanged axes fell by 2.1 points" in text


def test_summary_says_a_model_read_from_the_cache_is_cached_not_built_in_no_time(tmp_path, capsys):
    from trace_realign.steps import print_summary
    print_summary(tmp_path, {"prealign/seconds": 0.0, "prealign/cached": 1.0, "retrain/seconds": 12.5,
                             "retrain/cached": 0.0, "time/total_seconds": 40.0})
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()}
    assert lines == {"prealign/seconds": "cached", "retrain/seconds": "12.5", "time/total_seconds": "40"}


def test_verdict_without_axes_reads_overall_tpa_and_the_categories_measured_before():
    metrics = {"eval/before/tpa": 20.0, "eval/before/tpa_ci95": 3.0, "eval/after/tpa": 70.0, "eval/after/tpa_ci95": 4.0,
               "eval/before/tpa/invert": 10.0, "eval/after/tpa/invert": 80.0, "eval/after/tpa/retain": 90.0}
    lines = verdict(metrics)
    assert [line.split()[:3] for line in lines[1:-1]] == [["TPA", "(pi_new)", "20.0"], ["TPA,", "invert", "prompts"]]
    assert lines[2].split()[-3:] == ["10.0", "80.0", "+70.0"]
    assert lines[-1] == "  verdict: realigned: TPA overall rose from 20.0 to 70.0 (the 95 % intervals do not overlap)"
    assert verdict({"eval/before/tpa": 20.0}) == []  # nothing measured after: nothing to say


class Failing(Oracle):
    """Fails the calls for responses it is told to, like an API giving up after its retries."""

    def __init__(self, fail):
        self.fail, self.failures = fail, 0

    def judge(self, prompt, response, policy):
        if response in self.fail:
            self.failures += 1
            return None
        return response == "yes"

    def failure_counts(self):
        from collections import Counter

        return Counter({"server_error": self.failures})


def evaluate(monkeypatch, oracle, new, old, items, respond, evaluators=None):
    """The default evaluators (tpa, utility) on a stand-in model whose greedy answers `respond` gives."""
    import trace_realign.eval.base as base
    from trace_realign.eval import EvalInputs, run_evaluators

    monkeypatch.setattr(base, "generate", lambda model, tok, prompts, *a, **k: respond(prompts))
    inputs = EvalInputs(model=None, tokenizer=None, judge=oracle, new=new, old=old, items=items, when="after")
    m, item_rows, _ = run_evaluators(evaluators or {"tpa": TPA(), "utility": Utility()}, inputs)
    return m, [item_rows.get(i) for i in range(len(items))]


def test_failed_judge_calls_are_counted_and_too_many_stop_evaluation(monkeypatch):
    items = [{"prompt": f"p{i}", "kind": "value", "axis": "a"} for i in range(40)]
    m, rows = evaluate(monkeypatch, Failing({"boom"}), POLICY, POLICY, items, lambda ps: ["yes"] * 38 + ["boom", "yes"])
    assert m["eval/after/judge_failed"] == 2  # one prompt, judged under both policies
    assert m["eval/after/tpa"] == 100.0 and m["eval/after/tpa/undecided"] == 1 and rows[38]["tpa"] is None
    with pytest.raises(JudgeFailed, match="eval/after/tpa: 10 of 40 judge calls failed"):
        evaluate(monkeypatch, Failing({"boom"}), POLICY, POLICY, items, lambda ps: ["boom"] * 10 + ["yes"] * 30)


class ByPolicy(Oracle):
    """Complies when the response is one its policy lists; a sum is right when the response says "right"."""

    def judge(self, prompt, response, policy):
        if prompt.startswith("sum"):
            return response == "right"
        return response in policy.rules["ok"]


def test_evaluate_scores_each_policy_and_utility_apart(monkeypatch):
    new, old = Policy("new", "", {"ok": {"a"}}), Policy("old", "", {"ok": {"b"}})
    items = [{"prompt": "v0", "axis": "x"}, {"prompt": "sum0", "kind": "utility"}, {"prompt": "v1", "axis": "x"},
             {"prompt": "v2", "axis": "y", "kind": "value"}, {"prompt": "sum1", "kind": "utility"},
             {"prompt": "sum2", "kind": "utility"}, {"prompt": "sum3", "kind": "utility"}]
    answers = {"v0": "a", "v1": "b", "v2": "a", "sum0": "right", "sum1": "wrong", "sum2": "right", "sum3": "right"}
    asked = []
    m, rows = evaluate(monkeypatch, ByPolicy(), new, old, items, lambda ps: asked.append(ps) or [answers[p] for p in ps])
    assert asked == [["v0", "v1", "v2"], ["sum0", "sum1", "sum2", "sum3"]]  # each prompt generated once
    assert m["eval/after/n"] == 3 and m["eval/after/n_utility"] == 4
    assert m["eval/after/tpa"] == pytest.approx(200 / 3) and m["eval/after/tpa_old"] == pytest.approx(100 / 3)
    assert m["eval/after/tpa/x"] == 50.0 and m["eval/after/tpa/y"] == 100.0 and m["eval/after/tpa_old/x"] == 50.0
    assert m["eval/after/tpa_old/y"] == 0.0
    assert m["eval/after/utility"] == 75.0
    assert m["eval/after/utility_ci95"] == pytest.approx(50 * (wilson_interval(3, 4)[1] - wilson_interval(3, 4)[0]))
    assert m["eval/after/judge_failed"] == 0
    assert rows == [{"response": "a", "tpa": True, "tpa_old": False}, {"response": "right", "correct": True},
                    {"response": "b", "tpa": False, "tpa_old": True}, {"response": "a", "tpa": True, "tpa_old": False},
                    {"response": "wrong", "correct": False}, {"response": "right", "correct": True},
                    {"response": "right", "correct": True}]


def test_evaluation_with_no_verdict_at_all_stops(monkeypatch):
    items = [{"prompt": f"p{i}"} for i in range(3)]
    with pytest.raises(RuntimeError, match="no verdict on any of 3 generations"):
        evaluate(monkeypatch, Table({}), POLICY, POLICY, items, lambda ps: ["???"] * len(ps))
    assert evaluate(monkeypatch, Table({}), POLICY, POLICY, [], lambda ps: []) == ({"eval/after/judge_failed": 0.0}, [])


def test_sampled_tpa_averages_each_prompts_share_and_takes_its_interval_over_prompts(monkeypatch):
    import trace_realign.eval.base as base
    from trace_realign.eval import EvalInputs, GenerationSettings, mean_with_ci, run_evaluators

    items = [{"prompt": "p0", "axis": "x"}, {"prompt": "p1", "axis": "x"}, {"prompt": "p2", "axis": "y"}]
    drawn = {"p0": ["yes", "yes", "no", "???"], "p1": ["no"] * 4, "p2": ["yes"] * 4}

    def fake(model, tok, prompts, *a, samples=0, **k):
        return [drawn[p] for p in prompts] if samples else ["yes"] * len(prompts)

    monkeypatch.setattr(base, "generate", fake)
    inputs = EvalInputs(model=None, tokenizer=None, judge=Table({"yes": True, "no": False}), new=POLICY, old=POLICY,
                        items=items, generation=GenerationSettings(samples=4, temperature=0.7))
    m, rows, _ = run_evaluators({"tpa": TPA()}, inputs)
    assert m["eval/after/tpa"] == 100.0  # greedy beside sampled
    shares = [200 / 3, 0.0, 100.0]  # p0: 2 of its 3 decided samples
    assert m["eval/after/tpa_sampled"] == pytest.approx(sum(shares) / 3)
    assert m["eval/after/tpa_sampled_ci95"] == pytest.approx(mean_with_ci(shares)[1])  # wider than Wilson on 3 prompts
    assert mean_with_ci(shares)[1] > 50 * (wilson_interval(2, 3)[1] - wilson_interval(2, 3)[0])
    # all prompts fully compliant: the normal interval has no width, the prompts' Wilson interval has
    assert m["eval/after/tpa_sampled/y"] == 100.0
    assert m["eval/after/tpa_sampled_ci95/y"] == pytest.approx(50 * (1 - wilson_interval(1, 1)[0]))
    assert m["eval/after/tpa_sampled/x"] == pytest.approx(100 / 3) and m["eval/after/tpa_sampled/y"] == 100.0
    assert m["eval/after/tpa_sampled/undecided"] == 1 and m["eval/after/tpa_sampled/samples"] == 4
    assert rows[0]["samples"][3] == {"response": "???", "tpa": None}


def test_mean_with_ci_by_hand():
    from trace_realign.eval import mean_with_ci

    mean, half = mean_with_ci([0.0, 50.0, 100.0])  # sd 50, n 3
    assert mean == 50.0 and half == pytest.approx(1.959963984540054 * 50 / math.sqrt(3))
    assert mean_with_ci([7.0]) == (7.0, 0.0) and mean_with_ci([]) == (0.0, 0.0)


class Echo(torch.nn.Module):
    """A 'model' whose generation repeats its prompt's own tokens (those the attention mask keeps), after
    checking that the batch is left-padded; it records how it was asked."""

    def __init__(self, pad_id):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.pad_id, self.calls = pad_id, []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"rows": len(input_ids), "training": self.training, **kwargs})
        width = input_ids.shape[1]
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n = sum(mask)
            assert mask == [0] * (width - n) + [1] * n and ids[: width - n] == [self.pad_id] * (width - n)
            rows.append(ids + ids[width - n:] + [self.pad_id] * (width - n))  # right-padded continuation
        return torch.tensor(rows)


def test_generate_answers_in_the_prompts_order_whatever_the_batching():
    from trace_realign.eval import generate
    from trace_realign.models.loading import build_tokenizer

    prompts = ["How do I bake bread at home today?", "Hi", "What is 3 plus 4?", "Tell me a story about a dog.", "Why?"]
    tok = build_tokenizer(prompts, 300)
    model = Echo(tok.pad_token_id)
    model.train()
    plain = build_tokenizer(prompts, 300)
    plain.chat_template = None  # the prompt goes in raw: its last token is text, not a role tag
    assert generate(model, plain, prompts, max_new_tokens=7, batch_size=2, progress=False) == prompts
    for batch_size in (1, 2, 16):
        model.calls.clear()
        assert generate(model, tok, prompts, max_new_tokens=7, batch_size=batch_size, progress=False) == prompts
        assert [c["rows"] for c in model.calls] == [min(batch_size, 5 - i) for i in range(0, 5, batch_size)]
        assert all(c["max_new_tokens"] == 7 and c["do_sample"] is False and not c["training"] for c in model.calls)
        assert all(c["pad_token_id"] == tok.pad_token_id and c["eos_token_id"] == tok.eos_token_id for c in model.calls)
    assert model.training  # put back in the mode it was in


def test_sampling_is_seeded_leaves_the_callers_random_stream_alone_and_groups_samples_per_prompt():
    from transformers import LlamaConfig, LlamaForCausalLM

    from trace_realign.eval import generate
    from trace_realign.models.loading import build_tokenizer

    prompts = ["How do I bake bread at home today?", "Hi", "What is 3 plus 4?"]
    tok = build_tokenizer(prompts * 3, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False, samples=4, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # training after evaluation draws what it would have drawn
    b = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False, samples=4, temperature=1.0, seed=7)
    c = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False, samples=4, temperature=1.0, seed=8)
    assert [len(x) for x in a] == [4, 4, 4] and all(isinstance(s, str) for x in a for s in x)
    assert a == generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False, samples=4, seed=7)
    assert a != c  # another seed, other samples (an untrained model samples nearly uniformly)
    assert len({s for x in a for s in x}) > 3  # sampled, not the greedy answer four times
    greedy = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert len(greedy) == 3 and all(isinstance(g, str) for g in greedy)
    assert len(b) == 3


def test_generation_settings_refuse_nonsense():
    from trace_realign.eval import GenerationSettings

    with pytest.raises(ValueError, match="samples must be >= 0"):
        GenerationSettings(samples=-1)
    with pytest.raises(ValueError, match="temperature > 0"):
        GenerationSettings(samples=2, temperature=0.0)
    GenerationSettings(samples=0, temperature=0.0)  # greedy ignores the temperature
