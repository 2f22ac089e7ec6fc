"""Data sources: what a source serves (train pairs, held-out prompts, pi_old and pi_new, its texts) and
JsonlSource, pairs from local files."""

from __future__ import annotations

from typing import Any, Protocol

from trace_realign.core.records import PreferencePair, load_eval_prompts, load_pairs
from trace_realign.data.world.synthetic import load_policy
from trace_realign.oracle.base import Policy


class NoConflictsError(RuntimeError):
    """Triage found no pair to invert or punish: there is nothing to re-align."""


class DataSource(Protocol):
    old: Policy
    new: Policy

    def train_pairs(self) -> list[PreferencePair]: ...

    def eval_prompts(self) -> list[dict[str, Any]]: ...

    def corpus(self) -> list[str]: ...


class JsonlSource:
    """Preference pairs from local .json/.jsonl files; categories, if present, can stand in for triage.

    train_path: records {prompt, chosen, rejected[, category, correction, meta]} (records.validate_record);
    layout="reference" reads the reference implementation's files (records.from_reference_layout).
    test_path: held-out prompts {prompt[, axis, category, shift, kind]}; other keys are ignored
    (records.validate_eval_prompt), so a pair file or a run's data/eval.jsonl serves as well.
    """

    def __init__(self, train_path: str, test_path: str | None, policy_old: str, policy_new: str, triaged: bool = False,
                 layout: str = "trace"):
        self.train_path, self.test_path, self.triaged, self.layout = train_path, test_path, triaged, layout
        self.old, self.new = load_policy(policy_old), load_policy(policy_new)

    def train_pairs(self) -> list[PreferencePair]:
        return load_pairs(self.train_path, require_category=self.triaged, layout=self.layout)

    def eval_prompts(self) -> list[dict[str, Any]]:
        if not self.test_path:
            return []
        return load_eval_prompts(self.test_path)

    def corpus(self) -> list[str]:
        return [t for p in self.train_pairs() for t in (p.prompt, p.chosen, p.rejected)]

    def policy(self, name_or_path: str) -> Policy:
        """Any policy file in the world's format, for agreement beside TPA (eval.policies)."""
        return load_policy(name_or_path)
