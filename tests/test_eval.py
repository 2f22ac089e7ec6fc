"""Evaluation: TPA per group and utility, from judged generations."""

from __future__ import annotations

import pytest

from trace_realign.eval import agreement
from trace_realign.oracle import Oracle, Policy

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
    ]
    oracle = Table({"yes": True, "no": False})
    out = agreement(oracle, POLICY, items, ["yes", "no", "yes", "???"])
    assert out[""] == pytest.approx(50.0)
    assert out["/medical"] == pytest.approx(50.0)
    assert out["/invert"] == pytest.approx(50.0) and out["/shifted"] == pytest.approx(50.0)
    assert out["/privacy"] == 100.0 and out["/risky"] == 0.0
    assert out["/retain"] == pytest.approx(50.0) and out["/unchanged"] == pytest.approx(50.0)
    # an undecided verdict counts as non-compliant, and is itself counted
    assert out["/undecided"] == 1.0
