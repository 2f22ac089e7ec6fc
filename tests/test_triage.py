"""Stage 1 triage (Algorithm 1, lines 1-7 and 16) against a stub oracle whose verdicts the test defines."""

from __future__ import annotations

from collections import Counter

import pytest

from trace_realign.core.records import INVERT, PUNISH, RETAIN, PreferencePair
from trace_realign.oracle.base import Oracle, Policy
from trace_realign.oracle.triage import triage, triage_category

POLICY = Policy(name="new", text="the new policy")


class StubOracle(Oracle):
    """Verdicts and corrections from dicts; every call is counted. Unknown items are judged None."""

    def __init__(self, verdicts: dict, corrections: dict | None = None):
        self.verdicts, self.corrections = verdicts, corrections or {}
        self.judged: Counter = Counter()
        self.corrected: Counter = Counter()
        self.policies: list = []

    def judge(self, prompt, response, policy):
        self.judged[(prompt, response)] += 1
        self.policies.append(policy)
        return self.verdicts.get((prompt, response))

    def correct(self, prompt, policy):
        self.corrected[prompt] += 1
        return self.corrections.get(prompt)


# prompt -> (c_w, c_l, expected outcome); None in the outcome column means excluded (undecided)
FIXTURE = {
    "x0": (True, False, RETAIN),
    "x1": (True, True, RETAIN),
    "x2": (False, True, INVERT),
    "x3": (False, False, PUNISH),
    "x4": (None, True, None),
    "x5": (False, None, None),
    "x6": (True, None, None),  # c_w is true, but an undecided c_l is never read as retain
    "x7": (False, False, PUNISH),
    "x8": (None, None, None),
    "x9": (False, True, INVERT),
    "x10": (True, False, RETAIN),
}


def make_pairs() -> list[PreferencePair]:
    return [PreferencePair(x, f"w-{x}", f"l-{x}", meta={"i": i}) for i, x in enumerate(FIXTURE)]


def make_verdicts() -> dict:
    out = {}
    for x, (c_w, c_l, _) in FIXTURE.items():
        out[(x, f"w-{x}")] = c_w
        out[(x, f"l-{x}")] = c_l
    return out


@pytest.mark.parametrize(
    "c_w,c_l,expected",
    [(False, True, INVERT), (False, False, PUNISH), (True, False, RETAIN), (True, True, RETAIN)],
)
def test_triage_category_truth_table(c_w, c_l, expected):
    assert triage_category(c_w, c_l) == expected


@pytest.mark.parametrize("batch_size", [1, 2, 3, 256])
def test_triage_categories_and_exclusions(batch_size):
    pairs = make_pairs()
    oracle = StubOracle(make_verdicts())
    result = triage(pairs, oracle, POLICY, batch_size=batch_size)

    expected = [(x, cat) for x, (_, _, cat) in FIXTURE.items() if cat is not None]
    assert [(p.prompt, p.category) for p in result.pairs] == expected  # input order kept
    assert all(p.correction is None for p in result.pairs)
    assert [p.meta["i"] for p in result.pairs] == [int(x[1:]) for x, _ in expected]  # meta carried through
    assert result.counts() == {INVERT: 2, PUNISH: 2, RETAIN: 3}
    assert result.excluded == Counter({"undecided": 4})
    assert result.metrics() == {
        "triage/invert": 2, "triage/punish": 2, "triage/retain": 3, "triage/excluded/undecided": 4,
    }
    assert sum(result.counts().values()) + sum(result.excluded.values()) == len(pairs)
    # each response is judged exactly once, always under the policy given
    assert oracle.judged == Counter({k: 1 for k in make_verdicts()})
    assert all(p is POLICY for p in oracle.policies)
    assert not oracle.corrected
    # the input is not mutated
    assert all(p.category is None for p in pairs)


def test_all_undecided():
    pairs = make_pairs()
    result = triage(pairs, StubOracle({}), POLICY)
    assert result.pairs == []
    assert result.excluded == Counter({"undecided": len(pairs)})
    assert result.counts() == {INVERT: 0, PUNISH: 0, RETAIN: 0}


def test_triage_overwrites_a_stale_category():
    pairs = [PreferencePair("x2", "w-x2", "l-x2", category=RETAIN)]
    result = triage(pairs, StubOracle(make_verdicts()), POLICY)
    assert [p.category for p in result.pairs] == [INVERT]


def test_corrections_attach_to_punished_pairs():
    # Four more punished pairs whose corrections fail in each possible way.
    extra = {"x11": "bad", "x12": None, "x13": "   ", "x14": "undecided"}
    pairs = make_pairs() + [PreferencePair(x, f"w-{x}", f"l-{x}") for x in extra]
    verdicts = make_verdicts()
    for x in extra:
        verdicts[(x, f"w-{x}")] = verdicts[(x, f"l-{x}")] = False
    corrections = {"x3": "fix-x3", "x7": "fix-x7", **{x: y for x, y in extra.items()}}
    verdicts[("x3", "fix-x3")] = True
    verdicts[("x7", "fix-x7")] = True
    verdicts[("x11", "bad")] = False  # the oracle's own correction violates: excluded
    verdicts[("x13", "   ")] = True  # whitespace is no correction, whatever the verdict
    # ("x14", "undecided") is not in the dict: judged None, excluded

    oracle = StubOracle(verdicts, corrections)
    result = triage(pairs, oracle, POLICY, corrections=True, batch_size=4)

    by_prompt = {p.prompt: p for p in result.pairs}
    assert by_prompt["x3"].correction == "fix-x3" and by_prompt["x3"].category == PUNISH
    assert by_prompt["x7"].correction == "fix-x7" and by_prompt["x7"].category == PUNISH
    assert not set(extra) & set(by_prompt)
    assert all(p.correction is None for p in result.pairs if p.category != PUNISH)
    assert result.excluded == Counter({"undecided": 4, "correction_failed": 4})
    assert result.metrics()["triage/excluded/correction_failed"] == 4
    assert result.counts() == {INVERT: 2, PUNISH: 2, RETAIN: 3}
    assert sum(result.counts().values()) + sum(result.excluded.values()) == len(pairs)

    # corrections are asked only for punished pairs: accepted ones once, rejected ones for every
    # one of the bounded attempts (3 by default), then given up
    assert oracle.corrected == Counter({"x3": 1, "x7": 1, **{x: 3 for x in extra}})
    # every chosen / rejected response is judged exactly once; an accepted correction once, a rejected
    # one once per attempt
    for p in pairs:
        assert oracle.judged[(p.prompt, p.chosen)] == 1
        assert oracle.judged[(p.prompt, p.rejected)] == 1
    assert oracle.judged[("x3", "fix-x3")] == oracle.judged[("x7", "fix-x7")] == 1
    assert oracle.judged[("x11", "bad")] == 3


class FailingOracle(StubOracle):
    """A stub whose calls about items mentioning FAIL fail (None, counted as a failed call), like an API's."""

    def __init__(self, verdicts: dict, corrections: dict | None = None):
        super().__init__(verdicts, corrections)
        self.failures: Counter = Counter()

    def failure_counts(self) -> Counter:
        return Counter(self.failures)

    def judge(self, prompt, response, policy):
        if "FAIL" in response:
            self.judged[(prompt, response)] += 1
            self.failures["timeout"] += 1
            return None
        return super().judge(prompt, response, policy)

    def correct(self, prompt, policy):
        if "WRITEFAIL" in prompt:
            self.corrected[prompt] += 1
            self.failures["server_error"] += 1
            return None
        return super().correct(prompt, policy)


def test_failed_calls_are_oracle_failed_and_undecided_verdicts_undecided():
    verdicts = {("a", "w"): False, ("a", "l"): True, ("b", "w"): True}  # b's rejected: undecided
    pairs = [PreferencePair("a", "w", "l"), PreferencePair("b", "w", "l"),
             PreferencePair("c", "FAIL w", "l"), PreferencePair("d", "w", "FAIL l")]
    verdicts.update({("c", "l"): False, ("d", "w"): False})
    oracle = FailingOracle(verdicts)
    assert oracle.failed_calls == 0
    result = triage(pairs, oracle, POLICY, batch_size=2)  # one batch answered in full, one with failed calls
    assert [(p.prompt, p.category) for p in result.pairs] == [("a", INVERT)]
    assert result.excluded == Counter({"undecided": 1, "oracle_failed": 2})
    assert oracle.failed_calls == 2 and oracle.failure_counts() == Counter({"timeout": 2})


def test_a_failed_correction_call_is_no_rejected_correction():
    # every pair is punished; corrections: x accepted, y always rejected, z's write fails, v's check fails
    pairs = [PreferencePair(x, "w", "l") for x in ("x", "y", "WRITEFAIL z", "v")]
    verdicts = {(p.prompt, r): False for p in pairs for r in (p.chosen, p.rejected)}
    verdicts[("x", "fix-x")] = True
    verdicts[("y", "bad-y")] = False
    oracle = FailingOracle(verdicts, {"x": "fix-x", "y": "bad-y", "v": "FAIL fix-v"})
    result = triage(pairs, oracle, POLICY, corrections=True)
    assert [(p.prompt, p.correction) for p in result.pairs] == [("x", "fix-x")]
    assert result.excluded == Counter({"correction_failed": 1, "oracle_failed": 2})
    # a failed call ends this run's tries for its pair (a rerun asks again); a rejection is tried afresh
    assert oracle.corrected == Counter({"x": 1, "y": 3, "WRITEFAIL z": 1, "v": 1})
    assert oracle.judged[("v", "FAIL fix-v")] == 1 and oracle.judged[("y", "bad-y")] == 3
    assert oracle.failure_counts() == Counter({"server_error": 1, "timeout": 1})


def test_noisy_oracle_reports_its_base_oracles_failures():
    from trace_realign.oracle.base import NoisyOracle

    base = FailingOracle({("a", "w"): True})
    noisy = NoisyOracle(base, 0.5, seed=1)
    result = triage([PreferencePair("a", "w", "FAIL l")], noisy, POLICY)
    assert result.excluded == Counter({"oracle_failed": 1}) and noisy.failed_calls == base.failed_calls == 1
    base.max_failed_fraction = 0.2
    assert noisy.max_failed_fraction == 0.2  # the bound is the base oracle's setting


def test_corrections_not_requested_without_punished_pairs():
    verdicts = {("a", "w"): False, ("a", "l"): True}
    oracle = StubOracle(verdicts, {"a": "never"})
    result = triage([PreferencePair("a", "w", "l")], oracle, POLICY, corrections=True)
    assert [p.category for p in result.pairs] == [INVERT]
    assert not oracle.corrected
    assert result.pairs[0].correction is None


def test_triage_agreement_counts_confusions_and_kappa():
    from trace_realign.core.records import PreferencePair
    from trace_realign.oracle.triage import triage_agreement

    def pairs(cats):
        return [PreferencePair(f"p{i}", "w", "l", category=c) for i, c in enumerate(cats)]

    a = pairs(["invert", "invert", "punish", "retain", "retain", "retain"])
    b = pairs(["invert", "punish", "punish", "retain", "retain", "invert"]) + [PreferencePair("extra", "w", "l", category="retain")]
    m = triage_agreement(a, b)
    assert m["compared"] == 6 and m["only_second"] == 1 and m["only_first"] == 0
    assert m["agreement"] == 4 / 6
    # chance: a = (2, 1, 3)/6, b = (2, 2, 2)/6 -> (4 + 2 + 6) / 36 = 1/3
    assert m["kappa"] == pytest.approx((4 / 6 - 1 / 3) / (1 - 1 / 3))
    assert m["confusion/invert/punish"] == 1 and m["confusion/retain/invert"] == 1 and m["confusion/retain/retain"] == 2
    assert triage_agreement(a, a)["kappa"] == 1.0
