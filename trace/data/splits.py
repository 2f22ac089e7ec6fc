"""Stages on triaged pairs: stratified splits, nested subsets, label noise and the DPO-Gold relabelling.

Every function takes records and returns records; randomness comes from a seed and, where an item's fate
must not depend on what else is in the set (noise), from a hash of the item itself.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Mapping, Sequence

from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN, PreferencePair

DPO_GOLD_PUNISH = ("keep", "drop", "correction")


def _targets(counts: Mapping[str, int], total: int, size: int) -> dict[str, int]:
    """Per-category sizes proportional to `counts` summing to `size` (largest remainders)."""
    if total == 0:
        return {c: 0 for c in counts}
    exact = {c: size * n / total for c, n in counts.items()}
    out = {c: int(v) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (out[c] - exact[c], c))[: size - sum(out.values())]:
        out[c] += 1
    return out


def stratified_split(
    pairs: Sequence[PreferencePair], sizes: Mapping[str, int | None], seed: int
) -> tuple[dict[str, list[PreferencePair]], int]:
    """Split pairs into named splits of the given sizes with the same category mix in each.

    Pairs that share a prompt go to the same split, so no test prompt is ever trained on. At most one
    size may be null: that split takes every remaining pair. Returns (splits, pairs left unused).
    """
    rest = [name for name, n in sizes.items() if n is None]
    if len(rest) > 1:
        raise ValueError(f"data.splits: at most one split may take the rest (null), got {rest}")
    fixed = {name: int(n) for name, n in sizes.items() if n is not None}
    if any(n < 0 for n in fixed.values()):
        raise ValueError(f"data.splits: sizes must be >= 0, got {dict(sizes)}")
    if sum(fixed.values()) > len(pairs):
        raise ValueError(f"data.splits: sizes {fixed} ask for {sum(fixed.values())} pairs; only {len(pairs)} were triaged")
    counts = Counter(p.category for p in pairs)
    target = {name: _targets(counts, len(pairs), n) for name, n in fixed.items()}
    groups: dict[str, list[PreferencePair]] = defaultdict(list)
    for p in pairs:
        groups[p.prompt].append(p)
    order = list(groups)
    random.Random(f"{seed}:split").shuffle(order)
    order.sort(key=lambda prompt: -len(groups[prompt]))  # stable: big groups first, then the seeded order
    have = {name: Counter() for name in fixed}
    out: dict[str, list[PreferencePair]] = {name: [] for name in sizes}
    unused = 0
    for prompt in order:
        group = groups[prompt]
        need = Counter(p.category for p in group)
        room = [s for s in fixed if len(out[s]) + len(group) <= fixed[s]]

        def deficit(s: str) -> float:
            return sum(n * (target[s][c] - have[s][c]) / max(target[s][c], 1) for c, n in need.items())

        best = max(room, key=lambda s: (deficit(s), fixed[s] - len(out[s])), default=None)
        if best is not None and deficit(best) > 0:
            out[best] += group
            have[best].update(need)
        elif rest:
            out[rest[0]] += group
        elif best is not None:
            out[best] += group
            have[best].update(need)
        else:
            unused += len(group)
    return out, unused


def stratified_order(pairs: Sequence[PreferencePair], seed: int) -> list[PreferencePair]:
    """The pairs in an order whose every prefix keeps the category mix of the whole (within one pair per
    category). Subsets of size n are the first n, so a 5k subset lies inside the 10k one, which lies
    inside the 20k one, whatever sizes are asked for."""
    rng = random.Random(f"{seed}:order")
    by_cat = {c: [p for p in pairs if p.category == c] for c in CATEGORIES}
    for c in CATEGORIES:
        rng.shuffle(by_cat[c])
    total = len(pairs)
    taken = Counter()
    out: list[PreferencePair] = []
    for i in range(1, total + 1):
        # the category furthest behind its share of a prefix of length i
        cat = max((c for c in CATEGORIES if taken[c] < len(by_cat[c])),
                  key=lambda c: (i * len(by_cat[c]) / total - taken[c], -CATEGORIES.index(c)))
        out.append(by_cat[cat][taken[cat]])
        taken[cat] += 1
    return out


def nested_subset(pairs: Sequence[PreferencePair], size: int | None, seed: int) -> list[PreferencePair]:
    """The first `size` pairs of the stratified order (all of them when size is null)."""
    if size is not None and size < 1:
        raise ValueError(f"data.size must be >= 1 or null, got {size}")
    if size is not None and size > len(pairs):
        raise ValueError(f"data.size={size} is larger than the split it is drawn from ({len(pairs)} pairs)")
    ordered = stratified_order(pairs, seed)
    return ordered if size is None else ordered[:size]


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


NOISE_STYLES = ("category", "mixed")


def flip_labels(
    pairs: Sequence[PreferencePair], p: float, seed: int, style: str = "category"
) -> tuple[list[PreferencePair], int]:
    """Corrupt a seeded fraction p of pairs (Table 8's noisy oracle). An item is noisy when a hash of
    (seed, item) falls below p, so the pairs noisy at 10 % are among those noisy at 20 %, and an item keeps
    its noise in any subset.

    style="category": its triage label is replaced by another category. style="mixed", as the reference's
    create_noisy_splits.py: half of the noisy pairs (by another hash) get another category, the other half
    their chosen and rejected swapped under the same category. The clean label is kept in
    meta.clean_category, and a swap is marked meta.noise="swap"."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.label_noise must be in [0, 1], got {p}")
    if style not in NOISE_STYLES:
        raise ValueError(f"data.noise_style: {style!r}; expected one of {NOISE_STYLES}")
    out, flipped = [], 0
    for q in pairs:
        if p > 0 and _unit(seed, "flip", q.prompt, q.chosen, q.rejected) < p:
            meta = {**q.meta, "clean_category": q.category}
            if style == "mixed" and _unit(seed, "swap", q.prompt, q.chosen, q.rejected) < 0.5:
                out.append(replace(q, chosen=q.rejected, rejected=q.chosen, meta={**meta, "noise": "swap"}))
            else:
                others = [c for c in CATEGORIES if c != q.category]
                new = others[int(_unit(seed, "to", q.prompt, q.chosen, q.rejected) * len(others))]
                out.append(replace(q, category=new, meta={**meta, "noise": "category"}))
            flipped += 1
        else:
            out.append(q)
    return out, flipped


def relabel(p: PreferencePair, punish: str = "keep") -> PreferencePair | None:
    """One triaged pair as preferred under pi_new: inverted swapped, retained kept; punished kept (`keep`),
    left out (`drop`: None), or (correction, chosen) where the oracle wrote a correction (`correction`;
    without one: None)."""
    if p.category == INVERT:
        return replace(p, chosen=p.rejected, rejected=p.chosen)
    if p.category == PUNISH and punish == "drop":
        return None
    if p.category == PUNISH and punish == "correction":
        return replace(p, chosen=p.correction, rejected=p.chosen) if p.correction else None
    if p.category in (PUNISH, RETAIN):
        return p
    raise ValueError(f"dpo_gold: pair with prompt {p.prompt[:60]!r} is not triaged (category {p.category!r})")


def dpo_gold(pairs: Sequence[PreferencePair], punish: str = "keep") -> tuple[list[PreferencePair], int]:
    """The pairs relabelled for DPO under pi_new: inverted pairs swapped, retained pairs kept. Punished
    pairs (both responses violate) are kept as they are (`keep`, the reference's behaviour), left out
    (`drop`), or turned into (correction, chosen) where an oracle wrote a correction (`correction`).
    Returns (pairs, punished pairs left out)."""
    if punish not in DPO_GOLD_PUNISH:
        raise ValueError(f"data.dpo_gold_punish: {punish!r}; expected one of {DPO_GOLD_PUNISH}")
    relabelled = [relabel(p, punish) for p in pairs]
    return [p for p in relabelled if p is not None], sum(p is None for p in relabelled)


def category_counts(pairs: Sequence[PreferencePair]) -> dict[str, int]:
    c = Counter(p.category for p in pairs)
    return {cat: c.get(cat, 0) for cat in CATEGORIES}
