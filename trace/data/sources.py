"""Data sources: what a source serves (train pairs, held-out prompts, pi_old and pi_new, its texts) and
JsonlSource, pairs from local files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from trace_realign.core.records import DataError, PreferencePair, load_eval_prompts, load_pairs
from trace_realign.data.pku import POLICY_DIR as LABEL_POLICY_DIR
from trace_realign.data.pku import load_label_policy
from trace_realign.data.world.synthetic import POLICY_DIR as WORLD_POLICY_DIR
from trace_realign.data.world.synthetic import load_policy
from trace_realign.oracle.base import TEXT_SUFFIXES, Policy, load_text_policy, read_policy_file


class NoConflictsError(RuntimeError):
    """Triage found no pair to invert or punish: there is nothing to re-align."""


class DataSource(Protocol):
    old: Policy
    new: Policy

    def train_pairs(self) -> list[PreferencePair]: ...

    def eval_prompts(self) -> list[dict[str, Any]]: ...

    def corpus(self) -> list[str]: ...


def load_any_policy(name_or_path: str | Path) -> Policy:
    """A policy of any kind, told apart by what the file holds:
      - the embedded world's (`rules`: axis -> allowed stances), which its judge scores programmatically;
      - a label policy (`default_max_severity`, `max_severity`: harm category -> severity), for oracle=labels;
      - a written policy (a .md or .txt file, or YAML with `text`), which only an LLM oracle reads.
    Every kind renders as text, so oracle=openai judges against any of them. A bare name is a shipped policy
    (the world's pi_old, pi_new, pi_2; PKU's pku_old, pku_new)."""
    path = Path(name_or_path)
    if path.suffix in TEXT_SUFFIXES:
        return load_text_policy(path)
    if not path.suffix:
        shipped = [d / f"{path}.yaml" for d in (WORLD_POLICY_DIR, LABEL_POLICY_DIR) if (d / f"{path}.yaml").is_file()]
        if not shipped:
            raise DataError(str(name_or_path), None, None, "no policy of this name is shipped (pi_old, pi_new, pi_2, "
                                                           "pku_old, pku_new); give a policy file's path")
        path = shipped[0]
    source, data = read_policy_file(path, path.parent)
    if isinstance(data, dict) and "rules" in data:
        return load_policy(path)
    if isinstance(data, dict) and ("default_max_severity" in data or "max_severity" in data):
        return load_label_policy(path)
    if isinstance(data, dict) and "text" in data:
        return load_text_policy(path)
    raise DataError(source, None, None, "not a policy: expected `rules` (the embedded world's), `default_max_severity` "
                                        "and `max_severity` (a label policy) or `text` (a written policy)")


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
        self.old, self.new = load_any_policy(policy_old), load_any_policy(policy_new)

    def train_pairs(self) -> list[PreferencePair]:
        return load_pairs(self.train_path, require_category=self.triaged, layout=self.layout)

    def eval_prompts(self) -> list[dict[str, Any]]:
        if not self.test_path:
            return []
        return load_eval_prompts(self.test_path)

    def corpus(self) -> list[str]:
        return [t for p in self.train_pairs() for t in (p.prompt, p.chosen, p.rejected)]

    def policy(self, name_or_path: str) -> Policy:
        """Any policy (load_any_policy), for agreement beside TPA (eval.policies)."""
        return load_any_policy(name_or_path)
