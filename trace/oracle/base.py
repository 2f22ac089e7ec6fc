"""The oracle interface: who decides whether a response complies with a policy.

An oracle answers compliance for (prompt, response, policy) and may write a compliant response for a
prompt (Algorithm 1, line 16). The embedded world's programmatic judge, an LLM judge over an API and a
dataset's own labels all implement this one interface; triage and evaluation only ever see it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


@dataclass(frozen=True)
class Policy:
    """A written policy. `text` is what a language-model oracle reads; `rules` is its structured form."""

    name: str
    text: str
    rules: dict[str, Any] = field(default_factory=dict)


def read_policy_file(path_or_name: str | Path, policy_dir: Path) -> tuple[str, Any]:
    """(the file's path, its parsed YAML) for a path, or the name of a policy in `policy_dir`; each kind
    of policy checks the shape of what it reads."""
    from trace_realign.core.records import DataError

    path = Path(path_or_name)
    if not path.suffix:
        path = policy_dir / f"{path_or_name}.yaml"
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, None, "policy file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(source, None, None, f"invalid YAML: {exc}") from exc
    return source, data


TEXT_SUFFIXES = (".md", ".txt")


def load_text_policy(path: str | Path) -> Policy:
    """A written policy for a language-model oracle: a .md or .txt file (the whole file is the text, its
    stem the name), or a YAML mapping with `text` (and an optional `name`). It has no structured rules, so
    only an oracle that reads text (oracle=openai) can judge against it."""
    from trace_realign.core.records import DataError

    path = Path(path)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise DataError(str(path), None, None, "policy file not found")
        text = path.read_text(encoding="utf-8").strip()
        name = path.stem
    else:
        source, data = read_policy_file(path, path.parent)
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise DataError(source, None, "text", "a written policy needs `text`, the policy as the oracle reads it")
        text, name = data["text"].strip(), str(data.get("name", path.stem))
    if not text:
        raise DataError(str(path), None, "text", "the policy is empty")
    return Policy(name=name, text=text)


class Oracle:
    """Base class. Subclasses implement `judge`; batch calls default to a loop.

    A verdict is True (complies), False (violates) or None. None is either undecided (the oracle answered
    that it cannot decide: deterministic, as good as any answer to keep) or a failed call (an oracle over
    an API that gave up on a call for now: asked again by the next run, so nothing built on it is kept).
    `failure_counts` tells the two apart: it grows by one for every failed call. Callers must count None
    verdicts and never read them as compliance.
    """

    # The largest share of pairs triage may lose to failed calls before the run stops (oracle.max_failed_fraction).
    max_failed_fraction: float = 0.05

    def judge(self, prompt: str, response: str, policy: Policy) -> bool | None:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What decides this oracle's answers, for cache keys of the stages that ask it. The default names
        the class and its plain settings; oracles with runtime-only settings override it."""
        plain = {k: v for k, v in sorted(vars(self).items())
                 if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
        return f"{type(self).__module__}.{type(self).__qualname__}:{plain}"

    def judge_batch(self, items: Sequence[tuple[str, str]], policy: Policy) -> list[bool | None]:
        return [self.judge(prompt, response, policy) for prompt, response in items]

    def failure_counts(self) -> Counter:
        """Failed calls so far, by reason; empty for an oracle whose every call answers."""
        return Counter()

    @property
    def failed_calls(self) -> int:
        """How many calls failed so far (0 for an oracle whose every call answers)."""
        return sum(self.failure_counts().values())

    def judge_pairs(self, pairs: Sequence[tuple[str, str, str]], policy: Policy) -> list[tuple[bool | None, bool | None]]:
        """(c_w, c_l) for each (prompt, chosen, rejected); oracles that can judge both in one go override."""
        n = len(pairs)
        verdicts = self.judge_batch([(x, w) for x, w, _ in pairs] + [(x, l) for x, _, l in pairs], policy)
        return list(zip(verdicts[:n], verdicts[n:]))

    def correct(self, prompt: str, policy: Policy) -> str | None:
        """A response to `prompt` that complies with `policy`, or None when the oracle cannot write one."""
        return None

    def correct_batch(self, prompts: Sequence[str], policy: Policy, attempt: int = 0) -> list[str | None]:
        """Corrections for `prompts`; `attempt` counts earlier tries whose corrections were rejected."""
        return [self.correct(p, policy) for p in prompts]


class OracleFailuresError(RuntimeError):
    """Too many calls failed for the result to stand; answered calls are kept, so a rerun asks only the rest."""


def failure_summary(reasons: Counter) -> str:
    """'rate_limited: 3, timeout: 1' for a count of failed calls by reason."""
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


class NoisyOracle(Oracle):
    """Flips a seeded fraction p of another oracle's verdicts (the robustness study, paper Table 8).

    Whether an item flips depends only on (seed, policy, prompt, response), so a re-run, a resumed run and
    a second question about the same item all see the same verdict. Undecided verdicts stay undecided.
    """

    def __init__(self, base: Oracle, p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"oracle.noise must be in [0, 1], got {p}")
        self.base, self.p, self.seed = base, p, seed
        self.flipped = 0

    def fingerprint(self) -> str:
        return f"noisy(p={self.p}, seed={self.seed}):{self.base.fingerprint()}"

    def failure_counts(self) -> Counter:
        return self.base.failure_counts()

    @property
    def max_failed_fraction(self) -> float:  # type: ignore[override]
        return self.base.max_failed_fraction

    def _flips(self, prompt: str, response: str, policy: Policy) -> bool:
        digest = hashlib.sha256(f"{self.seed}\0{policy.name}\0{prompt}\0{response}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.p

    def judge_batch(self, items: Sequence[tuple[str, str]], policy: Policy) -> list[bool | None]:
        return [self._maybe_flip(x, y, v, policy) for (x, y), v in zip(items, self.base.judge_batch(items, policy))]

    def judge(self, prompt: str, response: str, policy: Policy) -> bool | None:
        return self.judge_batch([(prompt, response)], policy)[0]

    def judge_pairs(self, pairs: Sequence[tuple[str, str, str]], policy: Policy) -> list[tuple[bool | None, bool | None]]:
        # Keep the base oracle's own way of judging pairs (one call each, for instance); flip per response.
        out = []
        for (x, w, l), (c_w, c_l) in zip(pairs, self.base.judge_pairs(pairs, policy)):
            out.append(tuple(self._maybe_flip(x, y, v, policy) for y, v in ((w, c_w), (l, c_l))))
        return out

    def _maybe_flip(self, prompt: str, response: str, verdict: bool | None, policy: Policy) -> bool | None:
        if verdict is not None and self._flips(prompt, response, policy):
            self.flipped += 1
            return not verdict
        return verdict

    def correct_batch(self, prompts: Sequence[str], policy: Policy, attempt: int = 0) -> list[str | None]:
        return self.base.correct_batch(prompts, policy, attempt)


def build_oracles(oracle_cfg: Any, seed: int, source: Any = None, writer: bool = True) -> tuple[Oracle, Oracle]:
    """(the oracle realignment may use, the clean oracle evaluation judges with).

    `noise` is not the oracle's own setting: it wraps the oracle for triage and selection only, so that
    TPA is always measured by the clean judge. An oracle that reads the dataset's own annotations
    (oracle=labels) is bound to `source`; a source that has its responses written by an LLM
    (dataset=synthvaluebench) is handed the clean oracle's client, unless `writer` is false.
    """
    from hydra.utils import instantiate

    cfg = dict(oracle_cfg)
    noise = float(cfg.pop("noise", 0.0) or 0.0)
    clean = instantiate(cfg)
    if hasattr(clean, "bind"):
        clean.bind(source)
    if writer and hasattr(source, "bind_writer"):  # a benchmark whose responses the oracle's client writes
        source.bind_writer(clean)
    return (NoisyOracle(clean, noise, seed) if noise > 0 else clean), clean
