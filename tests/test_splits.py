"""Stratified splits, nested subsets, label noise, DPO-Gold, and the stage cache they are stored in."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN, PreferencePair
from trace_realign.data.splits import category_counts, dpo_gold, flip_labels, nested_subset, stratified_split
from trace_realign.data.stages import StageCache, stage_key


def triaged(n: int, mix=(0.5, 0.3, 0.2), group_sizes=(1,), seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    cats = [c for c, share in zip((RETAIN, INVERT, PUNISH), mix) for _ in range(round(share * n))]
    rng.shuffle(cats)
    out, prompt, left = [], 0, 0
    for i, c in enumerate(cats):
        if left == 0:
            prompt, left = prompt + 1, rng.choice(group_sizes)
        left -= 1
        out.append(PreferencePair(f"prompt {prompt}", f"chosen {i}", f"rejected {i}", category=c,
                                  correction=f"fix {i}" if c == PUNISH and i % 2 else None))
    return out


def shares(pairs):
    counts = category_counts(pairs)
    return {c: counts[c] / len(pairs) for c in CATEGORIES}


def test_stratified_split_has_exact_sizes_and_the_same_mix_in_every_split():
    pairs = triaged(2000)
    parts, unused = stratified_split(pairs, {"train1": 1000, "train2": 500, "test": None}, seed=0)
    assert [len(parts[s]) for s in ("train1", "train2", "test")] == [1000, 500, 500] and unused == 0
    whole = shares(pairs)
    for part in parts.values():
        assert all(abs(shares(part)[c] - whole[c]) <= 0.002 for c in CATEGORIES)
    assert sorted(p.chosen for part in parts.values() for p in part) == sorted(p.chosen for p in pairs)


def test_pairs_sharing_a_prompt_stay_in_one_split():
    pairs = triaged(3000, group_sizes=(1, 1, 2, 3))
    parts, _ = stratified_split(pairs, {"train1": 1500, "test": None}, seed=3)
    prompts = {s: {p.prompt for p in part} for s, part in parts.items()}
    assert not prompts["train1"] & prompts["test"]
    assert abs(len(parts["train1"]) - 1500) <= 2  # groups make sizes exact to within a group
    whole = shares(pairs)
    assert all(abs(shares(parts["train1"])[c] - whole[c]) < 0.01 for c in CATEGORIES)


def test_split_is_seeded_and_sizes_are_checked():
    pairs = triaged(100)
    a, _ = stratified_split(pairs, {"a": 50, "b": None}, seed=0)
    b, _ = stratified_split(pairs, {"a": 50, "b": None}, seed=0)
    c, _ = stratified_split(pairs, {"a": 50, "b": None}, seed=1)
    assert a == b and a != c
    with pytest.raises(ValueError, match="ask for 150 pairs; only 100"):
        stratified_split(pairs, {"a": 100, "b": 50}, seed=0)
    with pytest.raises(ValueError, match="at most one split"):
        stratified_split(pairs, {"a": None, "b": None}, seed=0)
    parts, unused = stratified_split(pairs, {"a": 30, "b": 20}, seed=0)  # no rest split: the others are unused
    assert len(parts["a"]) == 30 and len(parts["b"]) == 20 and unused == 50


def test_subsets_are_nested_and_keep_the_mix():
    pairs = triaged(2000)
    small, medium, large = (nested_subset(pairs, n, seed=0) for n in (500, 1000, 2000))
    assert small == medium[:500] and medium == large[:1000]
    assert {p.chosen for p in small} < {p.chosen for p in medium} < {p.chosen for p in large}
    whole = category_counts(pairs)
    for sub in (small, medium):
        counts = category_counts(sub)
        assert all(abs(counts[c] - whole[c] * len(sub) / len(pairs)) <= 1 for c in CATEGORIES)
    with pytest.raises(ValueError, match="larger than the split"):
        nested_subset(pairs, 2001, seed=0)


def test_label_noise_flips_the_fraction_asked_and_nests():
    pairs = triaged(4000)
    ten, n10 = flip_labels(pairs, 0.1, seed=0)
    twenty, n20 = flip_labels(pairs, 0.2, seed=0)
    assert abs(n10 / 4000 - 0.1) < 0.015 and abs(n20 / 4000 - 0.2) < 0.02
    flipped10 = {p.chosen for p in ten if "clean_category" in p.meta}
    flipped20 = {p.chosen for p in twenty if "clean_category" in p.meta}
    assert len(flipped10) == n10 and flipped10 < flipped20
    moves = Counter()
    for before, p in zip(pairs, twenty):
        if "clean_category" in p.meta:
            assert p.meta["clean_category"] == before.category and p.category != before.category
            moves[(before.category, p.category)] += 1
        else:
            assert p == before
    # a flipped label may become either other category, each about as often
    assert set(moves) == {(a, b) for a in CATEGORIES for b in CATEGORIES if a != b}
    for a in CATEGORIES:
        to = [n for (x, _), n in moves.items() if x == a]
        assert min(to) > 0.3 * sum(to), (a, moves)
    # an item's noisy label does not depend on the set it is in
    assert flip_labels(pairs[:10], 0.1, seed=0)[0] == ten[:10]
    assert flip_labels(pairs, 0.0, seed=0) == (list(pairs), 0)
    with pytest.raises(ValueError, match="label_noise"):
        flip_labels(pairs, 1.5, seed=0)


def test_mixed_label_noise_swaps_half_and_relabels_half_as_the_reference_does():
    pairs = triaged(4000)
    mixed, n = flip_labels(pairs, 0.2, seed=0, style="mixed")
    plain, n_plain = flip_labels(pairs, 0.2, seed=0)
    assert n == n_plain  # the same pairs are noisy, whatever the style
    kinds = Counter(p.meta.get("noise") for p in mixed)
    assert kinds["swap"] + kinds["category"] == n and abs(kinds["swap"] / n - 0.5) < 0.05
    for before, p in zip(pairs, mixed):
        if p.meta.get("noise") == "swap":
            assert (p.chosen, p.rejected, p.category) == (before.rejected, before.chosen, before.category)
        elif p.meta.get("noise") == "category":
            assert p.category != before.category and (p.chosen, p.rejected) == (before.chosen, before.rejected)
        else:
            assert p == before
    with pytest.raises(ValueError, match="noise_style"):
        flip_labels(pairs, 0.1, seed=0, style="swap")


def test_dpo_gold_swaps_inverted_pairs_and_punished_pairs_follow_config():
    pairs = triaged(100)
    gold, left = dpo_gold(pairs, "keep")
    assert len(gold) == 100 and left == 0
    for before, after in zip(pairs, gold):
        if before.category == INVERT:
            assert (after.chosen, after.rejected) == (before.rejected, before.chosen)
        else:
            assert (after.chosen, after.rejected) == (before.chosen, before.rejected)
    n_punish = category_counts(pairs)[PUNISH]
    assert 0 < n_punish < 100
    dropped, left = dpo_gold(pairs, "drop")
    assert left == n_punish
    assert dropped == [q for q in gold if q.category != PUNISH]  # the rest exactly as with "keep"
    corrected, left = dpo_gold(pairs, "correction")
    with_fix = [p for p in pairs if p.category == PUNISH and p.correction]
    assert 0 < len(with_fix) < n_punish
    assert left == n_punish - len(with_fix)
    # a punished pair with a correction becomes (correction over the old chosen); one without is left out
    expected = [q for q in gold if q.category != PUNISH or q.correction]
    assert [(q.prompt, q.category) for q in corrected] == [(q.prompt, q.category) for q in expected]
    for before, after in zip(expected, corrected):
        if before.category == PUNISH:
            assert (after.chosen, after.rejected) == (before.correction, before.chosen)
        else:
            assert after == before
    with pytest.raises(ValueError, match="dpo_gold_punish"):
        dpo_gold(pairs, "swap")


def test_stage_cache_reuses_rebuilds_and_never_keeps_a_torn_write(tmp_path):
    pairs = triaged(20)
    cache = StageCache(tmp_path)
    calls = Counter()

    def build():
        calls["n"] += 1
        return pairs, {"n": len(pairs)}

    key = stage_key("demo", size=20)
    assert cache.run("demo", key, build) == (pairs, {"n": 20})
    assert StageCache(tmp_path).run("demo", key, build) == (pairs, {"n": 20}) and calls["n"] == 1
    assert stage_key("demo", size=21) != key and stage_key("demo", size=20) == key
    StageCache(tmp_path).run("demo", stage_key("demo", size=21), build)
    assert calls["n"] == 2

    def dies():
        raise KeyboardInterrupt  # a kill in the middle of building

    broken = stage_key("demo", size=22)
    with pytest.raises(KeyboardInterrupt):
        StageCache(tmp_path).run("demo", broken, dies)
    assert not (tmp_path / "demo" / broken).exists()
    # a write cut short leaves only a temp dir, which is never read as an entry
    import trace_realign.data.stages as stages_mod

    def torn(table, path):
        path.write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    original = stages_mod.pq.write_table
    stages_mod.pq.write_table = torn
    try:
        with pytest.raises(OSError):
            StageCache(tmp_path).run("demo", broken, build)
    finally:
        stages_mod.pq.write_table = original
    assert not (tmp_path / "demo" / broken).exists()
    assert [p.name for p in (tmp_path / "demo").iterdir() if p.name.endswith(".tmp")] == []
    assert StageCache(tmp_path).run("demo", broken, build)[0] == pairs


def test_a_data_plan_that_cannot_work_fails_before_any_stage():
    from trace_realign.data.pipeline import DataPlan

    with pytest.raises(ValueError, match="data.train_split='train' is not one of data.splits"):
        DataPlan(splits={"train1": 10, "test": None})
    with pytest.raises(ValueError, match="eval_split must differ"):
        DataPlan(splits={"train1": 10, "test": None}, train_split="train1", eval_split="train1")
    with pytest.raises(ValueError, match="eval_split='dev' is not one of"):
        DataPlan(splits={"train1": 10, "test": None}, train_split="train1", eval_split="dev")
    with pytest.raises(ValueError, match="needs data.splits"):
        DataPlan(eval_split="test")
    with pytest.raises(ValueError, match="dpo_gold_punish"):
        DataPlan(dpo_gold_punish="swap")
    with pytest.raises(ValueError, match="data.size must be >= 1"):
        DataPlan(size=0)
    with pytest.raises(ValueError, match="label_noise"):
        DataPlan(label_noise=-0.1)
