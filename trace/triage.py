"""Stage 1, programmatic triage (Algorithm 1, lines 1-7).

(c_w, c_l) = compliance of chosen and rejected with pi_new:
    invert: c_w = 0, c_l = 1     punish: c_w = 0, c_l = 0     retain: c_w = 1
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

from tqdm.auto import tqdm

from trace_realign.oracle import Oracle, Policy
from trace_realign.records import CATEGORIES, INVERT, PUNISH, RETAIN, PreferencePair

log = logging.getLogger(__name__)


def triage_category(c_w: bool, c_l: bool) -> str:
    """Lines 4-6 of Algorithm 1."""
    if c_w:
        return RETAIN
    return INVERT if c_l else PUNISH


@dataclass
class TriageResult:
    """Triaged pairs plus an account of every pair that did not make it (nothing is dropped silently)."""

    pairs: list[PreferencePair]
    excluded: Counter = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        c = Counter(p.category for p in self.pairs)
        return {cat: c.get(cat, 0) for cat in CATEGORIES}

    def metrics(self) -> dict[str, int]:
        out = {f"triage/{k}": v for k, v in self.counts().items()}
        out.update({f"triage/excluded/{k}": v for k, v in sorted(self.excluded.items())})
        return out


def triage(
    pairs: Sequence[PreferencePair],
    oracle: Oracle,
    policy: Policy,
    corrections: bool = False,
    batch_size: int = 256,
) -> TriageResult:
    """Label every pair invert/punish/retain by the oracle's verdicts on both responses under `policy`.

    With `corrections`, the oracle writes y_c for each punished pair (line 16); a correction the oracle
    itself does not judge compliant, or none at all, excludes the pair with a count.
    """
    result = TriageResult(pairs=[])
    bar = tqdm(total=len(pairs), desc="triage", unit="pair", leave=False)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        n = len(chunk)
        verdicts = oracle.judge_pairs([(p.prompt, p.chosen, p.rejected) for p in chunk], policy)
        for p, (c_w, c_l) in zip(chunk, verdicts):
            if c_w is None or c_l is None:
                # An undecided verdict is not compliance: count the pair out instead of guessing.
                result.excluded["oracle_failed"] += 1
                continue
            result.pairs.append(replace(p, category=triage_category(c_w, c_l)))
        bar.update(n)
    bar.close()
    if corrections:
        attach_corrections(result, oracle, policy)
    log.info("triage: %s, excluded %s", result.counts(), dict(result.excluded))
    return result


def attach_corrections(result: TriageResult, oracle: Oracle, policy: Policy, attempts: int = 3) -> None:
    """Line 16: y_c for every punished pair, itself judged before use; a prompt whose corrections keep
    failing is retried up to `attempts` times, then its pair is excluded and counted."""
    pending = [i for i, p in enumerate(result.pairs) if p.category == PUNISH and p.correction is None]
    for attempt in range(attempts):
        if not pending:
            break
        prompts = [result.pairs[i].prompt for i in pending]
        written = oracle.correct_batch(prompts, policy, attempt=attempt)
        checks = oracle.judge_batch([(pr, y or "") for pr, y in zip(prompts, written)], policy)
        still = []
        for i, y_c, ok in zip(pending, written, checks):
            if y_c is not None and y_c.strip() and ok is True:
                result.pairs[i] = replace(result.pairs[i], correction=y_c)
            else:
                still.append(i)
        pending = still
    result.excluded["correction_failed"] += len(pending)
    drop = set(pending)
    result.pairs = [p for i, p in enumerate(result.pairs) if i not in drop]


def triage_agreement(a: Sequence[PreferencePair], b: Sequence[PreferencePair]) -> dict[str, float]:
    """How two triages of the same data agree (two oracles, or an oracle and the ground truth): pairs are
    matched by (prompt, chosen, rejected); reports the pairs both decided, their agreement, Cohen's kappa
    and the confusion counts `confusion/<a's category>/<b's category>`."""
    first = {(p.prompt, p.chosen, p.rejected): p.category for p in a}
    both = [(cat, b_cat) for p in b if (cat := first.get((p.prompt, p.chosen, p.rejected))) is not None
            for b_cat in [p.category]]
    n = len(both)
    out: dict[str, float] = {"compared": float(n), "only_first": float(len(first) - n), "only_second": float(len(b) - n)}
    if not n:
        return out
    agree = sum(x == y for x, y in both) / n
    pa, pb = Counter(x for x, _ in both), Counter(y for _, y in both)
    chance = sum(pa[c] * pb[c] for c in CATEGORIES) / n**2
    out.update({"agreement": agree, "kappa": (agree - chance) / (1 - chance) if chance < 1 else 1.0})
    pairs = Counter(both)
    out.update({f"confusion/{x}/{y}": float(pairs[(x, y)]) for x in CATEGORIES for y in CATEGORIES})
    return out
