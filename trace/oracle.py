"""The oracle interface: who decides whether a response complies with a policy.

An oracle answers compliance for (prompt, response, policy) and may write a compliant response for a
prompt (Algorithm 1, line 16). The embedded world's programmatic judge, an LLM judge over an API and a
dataset's own labels all implement this one interface; triage and evaluation only ever see it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Policy:
    """A written policy. `text` is what a language-model oracle reads; `rules` is its structured form."""

    name: str
    text: str
    rules: dict[str, Any] = field(default_factory=dict)


class Oracle:
    """Base class. Subclasses implement `judge`; batch calls default to a loop.

    A verdict is True (complies), False (violates) or None (the oracle could not decide). Callers must
    count None verdicts and never read them as compliance.
    """

    def judge(self, prompt: str, response: str, policy: Policy) -> bool | None:
        raise NotImplementedError

    def judge_batch(self, items: Sequence[tuple[str, str]], policy: Policy) -> list[bool | None]:
        return [self.judge(prompt, response, policy) for prompt, response in items]

    def correct(self, prompt: str, policy: Policy) -> str | None:
        """A response to `prompt` that complies with `policy`, or None when the oracle cannot write one."""
        return None

    def correct_batch(self, prompts: Sequence[str], policy: Policy) -> list[str | None]:
        return [self.correct(p, policy) for p in prompts]
