"""Stage 1, programmatic triage (Algorithm 1, lines 1-7).

(c_w, c_l) = compliance of chosen and rejected with pi_new:
    invert: c_w = 0, c_l = 1     punish: c_w = 0, c_l = 0     retain: c_w = 1

A pair without both verdicts is never triaged as anything: it is excluded and counted, as `undecided`
when the oracle answered that it cannot decide, or as `oracle_failed` when a call about it failed (asked
again by the next run).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

from tqdm.auto import tqdm

from trace_realign.core.progress import bar_off
from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN, PreferencePair
from trace_realign.oracle.base import Oracle, Policy

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
    bar = tqdm(total=len(pairs), desc="triage", unit="pair", disable=bar_off(True), leave=False)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        n = len(chunk)
        failed_before = oracle.failed_calls
        verdicts = oracle.judge_pairs([(p.prompt, p.chosen, p.rejected) for p in chunk], policy)
        missing = unanswered(oracle, failed_before)
        for p, (c_w, c_l) in zip(chunk, verdicts):
            if c_w is None or c_l is None:
                # No verdict is not compliance: count the pair out instead of guessing.
                result.excluded[missing] += 1
                continue
            result.pairs.append(replace(p, category=triage_category(c_w, c_l)))
        bar.update(n)
    bar.close()
    if corrections:
        attach_corrections(result, oracle, policy)
    log.info("triage: %s, excluded %s", result.counts(), dict(result.excluded))
    return result


def unanswered(oracle: Oracle, failed_before: int) -> str:
    """Why the None verdicts of a batch are missing: `oracle_failed` when any of its calls failed (the safe
    side: such a pair is asked again, never kept), else `undecided` (the oracle's own answer)."""
    return "oracle_failed" if oracle.failed_calls > failed_before else "undecided"


def correction_outcome(y_c: str | None, verdict: bool | None, write_failed: bool, check_failed: bool) -> str:
    """`accepted`, `rejected` (ask a fresh correction) or `failed` (a call failed: asked again next run)."""
    if y_c is None or not y_c.strip():
        return "failed" if y_c is None and write_failed else "rejected"
    if verdict is True:
        return "accepted"
    return "failed" if verdict is None and check_failed else "rejected"


def attach_corrections(result: TriageResult, oracle: Oracle, policy: Policy, attempts: int = 3) -> None:
    """Line 16: y_c for every punished pair, itself judged before use. A rejected correction (none
    written, or not judged compliant) is asked afresh, up to `attempts` times; then its pair is excluded
    as `correction_failed`. A failed call is no rejection: its pair is excluded as `oracle_failed` for this
    run, and a rerun asks again under the same attempt."""
    pending = [i for i, p in enumerate(result.pairs) if p.category == PUNISH and p.correction is None]
    failed: list[int] = []
    for attempt in range(attempts):
        if not pending:
            break
        failed_before = oracle.failed_calls
        written = oracle.correct_batch([result.pairs[i].prompt for i in pending], policy, attempt=attempt)
        write_failed = oracle.failed_calls > failed_before
        drafts = [(i, y) for i, y in zip(pending, written) if y is not None and y.strip()]
        failed_before = oracle.failed_calls
        checks = oracle.judge_batch([(result.pairs[i].prompt, y) for i, y in drafts], policy) if drafts else []
        check_failed = oracle.failed_calls > failed_before
        checked = dict(zip([i for i, _ in drafts], checks))
        still = []
        for i, y_c in zip(pending, written):
            outcome = correction_outcome(y_c, checked.get(i), write_failed, check_failed)
            if outcome == "accepted":
                result.pairs[i] = replace(result.pairs[i], correction=y_c)
            else:
                (failed if outcome == "failed" else still).append(i)
        pending = still
    result.excluded["correction_failed"] += len(pending)
    if failed:
        result.excluded["oracle_failed"] += len(failed)
    drop = set(pending) | set(failed)
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
