"""Noisy oracles for the robustness study: seeded, stable per item, never touching undecided verdicts."""

from __future__ import annotations

import pytest

from trace_realign.data.world import WorldJudge
from trace_realign.oracle.base import NoisyOracle, Oracle, Policy, build_oracles

POLICY = Policy(name="p", text="")


class Always(Oracle):
    def __init__(self, verdict):
        self.verdict = verdict

    def judge(self, prompt, response, policy):
        return self.verdict


ITEMS = [(f"prompt {i}", f"response {i}") for i in range(4000)]


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_flips_about_p_of_verdicts(p):
    out = NoisyOracle(Always(True), p, seed=0).judge_batch(ITEMS, POLICY)
    assert sum(v is False for v in out) / len(out) == pytest.approx(p, abs=0.03)


def test_same_item_same_verdict_and_seed_matters():
    a = NoisyOracle(Always(True), 0.3, seed=1)
    first = a.judge_batch(ITEMS[:500], POLICY)
    assert a.judge_batch(ITEMS[:500], POLICY) == first  # asked again: no new coin flips
    assert [a.judge(x, y, POLICY) for x, y in ITEMS[:50]] == first[:50]
    assert NoisyOracle(Always(True), 0.3, seed=2).judge_batch(ITEMS[:500], POLICY) != first


def test_edges_and_undecided():
    assert all(NoisyOracle(Always(True), 0.0).judge_batch(ITEMS[:100], POLICY))
    assert not any(NoisyOracle(Always(True), 1.0).judge_batch(ITEMS[:100], POLICY))
    assert NoisyOracle(Always(None), 1.0).judge_batch(ITEMS[:10], POLICY) == [None] * 10
    with pytest.raises(ValueError, match="oracle.noise"):
        NoisyOracle(Always(True), 1.5)


def test_build_oracles_keeps_evaluation_clean():
    noisy, clean = build_oracles({"_target_": "trace_realign.data.world.WorldJudge", "seed": 0, "noise": 0.2}, seed=3)
    assert isinstance(noisy, NoisyOracle) and isinstance(clean, WorldJudge) and noisy.base is clean
    assert (noisy.p, noisy.seed) == (0.2, 3)  # the configured noise, seeded by the run's seed
    plain, clean2 = build_oracles({"_target_": "trace_realign.data.world.WorldJudge", "seed": 0, "noise": 0.0}, seed=0)
    assert plain is clean2 and isinstance(plain, WorldJudge)
    unset, _ = build_oracles({"_target_": "trace_realign.data.world.WorldJudge", "seed": 0}, seed=0)
    assert isinstance(unset, WorldJudge)


def test_noisy_oracle_counts_its_flips_and_passes_corrections_through():
    class Writer(Always):
        def correct(self, prompt, policy):
            return f"fix {prompt}"

    noisy = NoisyOracle(Writer(True), 0.3, seed=0)
    out = noisy.judge_batch(ITEMS[:1000], POLICY)
    assert noisy.flipped == sum(v is False for v in out) > 0
    assert noisy.correct_batch(["a", "b"], POLICY) == ["fix a", "fix b"]  # never flipped: not a verdict
    assert noisy.fingerprint() != NoisyOracle(Writer(True), 0.3, seed=1).fingerprint()
    assert noisy.fingerprint() != NoisyOracle(Writer(True), 0.2, seed=0).fingerprint()


def test_pairs_and_single_verdicts_flip_the_same_items():
    pairs = [(f"x{i}", f"w{i}", f"l{i}") for i in range(300)]
    noisy = NoisyOracle(Always(True), 0.3, seed=4)
    by_pair = noisy.judge_pairs(pairs, POLICY)
    single = NoisyOracle(Always(True), 0.3, seed=4).judge_batch(
        [(x, w) for x, w, _ in pairs] + [(x, l) for x, _, l in pairs], POLICY)
    assert [c for c, _ in by_pair] == single[:300] and [c for _, c in by_pair] == single[300:]
