"""The triaged DataModule: triage once to disk, tokenised splits, and a step stream that serves one batch of
each non-empty category with prompt-masked labels and conflict indices laid out invert-then-punish."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN, DataError, load_pairs
from trace_realign.core.sequences import IGNORE_INDEX, SequenceLimits, encode_pair, encode_prompt
from trace_realign.data.pipeline import TRIAGE_METRICS_FILE, TRIAGED_FILE
from trace_realign.data.sources import JsonlSource, NoConflictsError
from trace_realign.data.world import SyntheticWorld, WorldJudge
from trace_realign.method.datamodule import TriagedDataModule
from trace_realign.method.objective import TRACE_TERMS
from trace_realign.models.loading import build_tokenizer
from trace_realign.oracle.base import Oracle

B = {INVERT: 3, PUNISH: 2, RETAIN: 4}


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(pairs_per_axis=16, test_prompts_per_axis=2)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world.corpus(), 600)


ORACLE_PUNISH = {**TRACE_TERMS, PUNISH: "relational_correction"}


def make_dm(tmp_path, source, tokenizer, oracle=None, batch_size=B, prepare=True, **kw) -> TriagedDataModule:
    dm = TriagedDataModule(source, oracle, tokenizer, work_dir=tmp_path / "work", batch_size=batch_size, **kw)
    if prepare:
        dm.prepare_data()
        dm.setup("fit")
    return dm


def steps(dm: TriagedDataModule, n: int) -> list[dict]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def write_triaged(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in pairs))
    return path


def pair_of(dm: TriagedDataModule, cat: str, index: int):
    return dm.splits[RETAIN][index] if cat == RETAIN else dm.conflict_pair(index)


def check_rows(dm: TriagedDataModule, tokenizer, cat: str, batch: dict) -> None:
    """Each row holds exactly the encoded (prompt, response) the layout promises, labels -100 on the prompt."""
    idx = batch["index"].tolist()
    n = len(idx)
    expected_rows = 2 * n if cat != RETAIN else n
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == batch["attention_mask"].shape[0] == expected_rows
    for r in range(expected_rows):
        pair = pair_of(dm, cat, idx[r % n])
        assert pair.category == cat
        response = dm.responses(cat, pair)[r // n]
        ids, labels, _ = encode_pair(tokenizer, pair.prompt, response, dm.limits)
        length = int(batch["attention_mask"][r].sum())
        assert length == len(ids)
        assert batch["input_ids"][r, :length].tolist() == ids
        assert batch["labels"][r, :length].tolist() == labels
        # the prompt is masked, the response is not, padding is masked
        n_prompt = len(encode_prompt(tokenizer, pair.prompt))
        row_labels = batch["labels"][r]
        assert (row_labels[:n_prompt] == IGNORE_INDEX).all()
        assert (row_labels[n_prompt:length] == batch["input_ids"][r, n_prompt:length]).all()
        assert (row_labels[n_prompt:length] != IGNORE_INDEX).all()
        assert (row_labels[length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][r, length:] == tokenizer.pad_token_id).all()


# -- prepare_data / setup ---------------------------------------------------------------------------


def test_prepare_data_writes_triage(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), prepare=False)
    dm.prepare_data()
    work = tmp_path / "work"
    metrics = json.loads((work / TRIAGE_METRICS_FILE).read_text())
    triaged = load_pairs(work / TRIAGED_FILE, require_category=True)
    n = len(world.train_pairs())
    assert metrics["data/rows"] == n
    excluded = sum(v for k, v in metrics.items() if k.startswith("triage/excluded/"))
    assert sum(metrics[f"triage/{c}"] for c in CATEGORIES) + excluded == n
    assert len(triaged) == n - excluded
    gt = Counter(p.meta["gt_category"] for p in world.train_pairs())
    assert {c: metrics[f"triage/{c}"] for c in CATEGORIES} == {c: gt[c] for c in CATEGORIES}
    assert Counter(p.category for p in triaged) == gt
    assert metrics["triage/gt_accuracy"] == 1.0


def test_prepare_data_runs_once(tmp_path, world, tokenizer):
    class Counting(WorldJudge):
        calls = 0

        def judge(self, prompt, response, policy):
            Counting.calls += 1
            return super().judge(prompt, response, policy)

    cache = tmp_path / "cache"
    dm = make_dm(tmp_path, world, tokenizer, Counting(), prepare=False, cache_dir=cache)
    dm.prepare_data()
    first = Counting.calls
    assert first == 2 * len(world.train_pairs())
    before = (tmp_path / "work" / TRIAGED_FILE).read_text()
    dm.prepare_data()  # called again (Lightning calls it once more on fit): nothing is redone
    assert Counting.calls == first
    # a new run on the same data reads the triage stage from the cache: the oracle is asked nothing
    again = TriagedDataModule(world, Counting(), tokenizer, work_dir=tmp_path / "again", batch_size=B, cache_dir=cache)
    again.prepare_data()
    assert Counting.calls == first
    assert (tmp_path / "again" / TRIAGED_FILE).read_text() == before
    # ... and without a cache every run triages afresh
    fresh = TriagedDataModule(world, Counting(), tokenizer, work_dir=tmp_path / "fresh", batch_size=B)
    fresh.prepare_data()
    assert Counting.calls == 2 * first


def test_setup_splits(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    metrics = json.loads((tmp_path / "work" / TRIAGE_METRICS_FILE).read_text())
    for c in CATEGORIES:
        assert len(dm.splits[c]) == len(dm.rows[c]) == metrics[f"triage/{c}"] > 0
        assert all(p.category == c for p in dm.splits[c])
        assert all(p.meta["gt_category"] == c for p in dm.splits[c])
    assert dm.num_conflicts == len(dm.splits[INVERT]) + len(dm.splits[PUNISH])
    assert all("second" in r for c in (INVERT, PUNISH) for r in dm.rows[c])
    assert all("second" not in r for r in dm.rows[RETAIN])
    assert dm.stats["data/rows"] == len(world.train_pairs())
    assert all(dm.stats[f"data/truncated/{c}"] == 0 for c in CATEGORIES)


def test_responses_layout(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    p = dm.splits[INVERT][0]
    assert dm.responses(INVERT, p) == (p.rejected, p.chosen)  # the old loser is now preferred
    q = dm.splits[PUNISH][0]
    assert dm.responses(PUNISH, q) == (q.chosen, q.rejected)
    r = dm.splits[RETAIN][0]
    assert dm.responses(RETAIN, r) == (r.chosen,)


@pytest.mark.parametrize("bad", [{INVERT: 1, PUNISH: 1}, {INVERT: 1, PUNISH: 0, RETAIN: 1}])
def test_batch_size_validated(tmp_path, world, tokenizer, bad):
    with pytest.raises(ValueError, match="data.batch_size"):
        make_dm(tmp_path, world, tokenizer, WorldJudge(), batch_size=bad, prepare=False)


def test_triage_needs_an_oracle(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, None, prepare=False)
    with pytest.raises(ValueError, match="oracle"):
        dm.prepare_data()


# -- the step stream --------------------------------------------------------------------------------


def test_every_step_has_each_category(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    for step in steps(dm, 6):
        assert set(step) == set(CATEGORIES)
        for cat in CATEGORIES:
            batch = step[cat]
            assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
            b = B[cat]
            assert batch["index"].shape == (b,)
            assert batch["input_ids"].shape[0] == (b if cat == RETAIN else 2 * b)
            assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
            check_rows(dm, tokenizer, cat, batch)


def test_conflict_indices(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    n_i, n_p, n_r = (len(dm.splits[c]) for c in CATEGORIES)
    seen = {c: set() for c in CATEGORIES}
    for step in steps(dm, 40):
        for cat in CATEGORIES:
            seen[cat] |= set(step[cat]["index"].tolist())
    assert seen[INVERT] == set(range(n_i))
    assert seen[PUNISH] == set(range(n_i, n_i + n_p))
    assert seen[RETAIN] == set(range(n_r))
    for k in range(n_i + n_p):
        cat, row = dm.conflict_row(k)
        assert cat == (INVERT if k < n_i else PUNISH)
        assert row["index"] == k
        assert dm.conflict_pair(k).category == cat


def test_one_pass_before_repeats(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    order = {c: [] for c in CATEGORIES}
    n_steps = max(2 * len(dm.rows[c]) // B[c] + 1 for c in CATEGORIES)
    for step in steps(dm, n_steps):
        for cat in CATEGORIES:
            order[cat] += step[cat]["index"].tolist()
    for cat in CATEGORIES:
        n = len(dm.rows[cat])
        start = len(dm.splits[INVERT]) if cat == PUNISH else 0
        full = set(range(start, start + n))
        assert len(order[cat]) >= 2 * n, "take enough steps for two passes"
        assert sorted(order[cat][:n]) == sorted(full), cat  # the first pass is a permutation
        assert sorted(order[cat][n : 2 * n]) == sorted(full), cat  # and so is the second
        assert order[cat][:n] != order[cat][n : 2 * n]  # reshuffled between passes


def test_stream_is_reproducible_and_seeded(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    a = [s[INVERT]["index"].tolist() for s in steps(dm, 5)]
    b = [s[INVERT]["index"].tolist() for s in steps(dm, 5)]
    assert a == b
    other = make_dm(tmp_path / "other", world, tokenizer, WorldJudge(), seed=1)
    assert [s[INVERT]["index"].tolist() for s in steps(other, 5)] != a


def test_selection_prompts_are_a_seeded_sample_of_distinct_training_prompts(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge())
    training = {p.prompt for c in CATEGORIES for p in dm.splits[c]}
    picked = dm.selection_prompts(10)
    assert len(picked) == len(set(picked)) == 10 and set(picked) <= training
    assert not set(picked) & {t["prompt"] for t in dm.eval_prompts()}  # never a held-out prompt
    assert dm.selection_prompts(10) == picked
    assert make_dm(tmp_path / "other", world, tokenizer, WorldJudge(), seed=1).selection_prompts(10) != picked
    assert sorted(dm.selection_prompts(10_000)) == sorted(training)  # no more than there are


def test_batch_larger_than_category(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), batch_size={INVERT: 500, PUNISH: 500, RETAIN: 1})
    step = steps(dm, 1)[0]
    assert sorted(step[INVERT]["index"].tolist()) == list(range(len(dm.splits[INVERT])))
    assert step[INVERT]["input_ids"].shape[0] == 2 * len(dm.splits[INVERT])
    assert step[RETAIN]["input_ids"].shape[0] == 1


# -- labelled data, empty categories, no conflicts ---------------------------------------------------


def jsonl_source(tmp_path, world, keep) -> JsonlSource:
    from dataclasses import replace

    pairs = [replace(p, category=p.meta["gt_category"]) for p in world.train_pairs() if p.meta["gt_category"] in keep]
    path = write_triaged(tmp_path / "train.jsonl", pairs)
    return JsonlSource(str(path), None, "pi_old", "pi_new", triaged=True)


def test_empty_punish_category(tmp_path, world, tokenizer):
    source = jsonl_source(tmp_path, world, {INVERT, RETAIN})
    dm = make_dm(tmp_path, source, tokenizer, None, trust_labels=True)
    assert dm.splits[PUNISH] == [] and dm.rows[PUNISH] == []
    n_i = len(dm.splits[INVERT])
    assert n_i > 0 and dm.num_conflicts == n_i
    metrics = json.loads((tmp_path / "work" / TRIAGE_METRICS_FILE).read_text())
    assert metrics["triage/punish"] == 0 and metrics["data/rows"] == len(source.train_pairs())
    for step in steps(dm, 5):
        assert set(step) == {INVERT, RETAIN}
        assert all(0 <= i < n_i for i in step[INVERT]["index"].tolist())
        check_rows(dm, tokenizer, INVERT, step[INVERT])


def test_trusted_labels_are_not_rejudged(tmp_path, world, tokenizer):
    class Refusing(Oracle):
        def judge(self, prompt, response, policy):
            raise AssertionError("trusted labels must not be re-triaged")

    source = jsonl_source(tmp_path, world, {INVERT, PUNISH, RETAIN})
    dm = make_dm(tmp_path, source, tokenizer, Refusing(), trust_labels=True)
    assert {c: len(dm.splits[c]) for c in CATEGORIES} == Counter(p.meta["gt_category"] for p in world.train_pairs())


def test_no_conflicts_from_labels(tmp_path, world, tokenizer):
    source = jsonl_source(tmp_path, world, {RETAIN})
    dm = make_dm(tmp_path, source, tokenizer, None, trust_labels=True, prepare=False)
    # stopped as the data is prepared, before any model work
    with pytest.raises(NoConflictsError, match="no pair to invert or punish") as info:
        dm.prepare_data()
    assert str(len(source.train_pairs())) in str(info.value)


def test_no_conflicts_from_triage(tmp_path, tokenizer):
    world = SyntheticWorld(axes=("privacy", "risky"), pairs_per_axis=6, test_prompts_per_axis=1)
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), prepare=False)
    with pytest.raises(NoConflictsError, match="no pair to invert or punish"):
        dm.prepare_data()


# -- ablations --------------------------------------------------------------------------------------


def test_no_triage_punishes_every_pair(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, None, use_triage=False)
    n = len(world.train_pairs())
    metrics = json.loads((tmp_path / "work" / TRIAGE_METRICS_FILE).read_text())
    assert metrics["data/rows"] == metrics["triage/punish"] == n
    assert metrics["triage/invert"] == metrics["triage/retain"] == 0
    assert "triage/gt_accuracy" not in metrics
    assert len(dm.splits[PUNISH]) == n and not dm.splits[INVERT] and not dm.splits[RETAIN]
    assert [p.prompt for p in dm.splits[PUNISH]] == [p.prompt for p in world.train_pairs()]
    for step in steps(dm, 3):
        assert set(step) == {PUNISH}
        assert all(0 <= i < n for i in step[PUNISH]["index"].tolist())
        check_rows(dm, tokenizer, PUNISH, step[PUNISH])
        # chosen first, rejected second
        i = step[PUNISH]["index"][0].item()
        ids, _, _ = encode_pair(tokenizer, dm.splits[PUNISH][i].prompt, dm.splits[PUNISH][i].chosen, dm.limits)
        assert step[PUNISH]["input_ids"][0, : len(ids)].tolist() == ids


def test_oracle_punish_uses_corrections(tmp_path, world, tokenizer):
    judge = WorldJudge()
    dm = make_dm(tmp_path, world, tokenizer, judge, terms=ORACLE_PUNISH)
    punished = dm.splits[PUNISH]
    assert punished
    for p in punished:
        assert p.correction and judge.judge(p.prompt, p.correction, world.new) is True
        assert dm.responses(PUNISH, p) == (p.correction, p.chosen)
    assert all(p.correction is None for c in (INVERT, RETAIN) for p in dm.splits[c])
    saved = load_pairs(tmp_path / "work" / TRIAGED_FILE, require_category=True)
    assert all(p.correction for p in saved if p.category == PUNISH)
    n_i = len(dm.splits[INVERT])
    for step in steps(dm, 4):
        batch = step[PUNISH]
        check_rows(dm, tokenizer, PUNISH, batch)
        b = len(batch["index"])
        for r, k in enumerate(batch["index"].tolist()):
            p = punished[k - n_i]
            want, _, _ = encode_pair(tokenizer, p.prompt, p.correction, dm.limits)
            assert batch["input_ids"][r, : len(want)].tolist() == want  # first response: the correction
            loser, _, _ = encode_pair(tokenizer, p.prompt, p.chosen, dm.limits)
            assert batch["input_ids"][b + r, : len(loser)].tolist() == loser


def test_pairs_that_label_noise_makes_punished_get_corrections_too(tmp_path, world, tokenizer):
    from trace_realign.data.pipeline import DataPlan

    judge = WorldJudge()
    dm = make_dm(tmp_path, world, tokenizer, judge, terms=ORACLE_PUNISH, plan=DataPlan(label_noise=0.3))
    made = [p for p in dm.splits[PUNISH] if p.meta.get("clean_category") in (INVERT, RETAIN)]
    assert made  # pairs triage did not punish, and so asked no correction for
    assert all(p.correction and judge.judge(p.prompt, p.correction, world.new) is True for p in dm.splits[PUNISH])


def test_oracle_punish_without_corrections_fails_at_setup(tmp_path, world, tokenizer):
    source = jsonl_source(tmp_path, world, {INVERT, PUNISH, RETAIN})  # labelled, but no corrections
    dm = make_dm(tmp_path, source, tokenizer, None, trust_labels=True, terms=ORACLE_PUNISH, prepare=False)
    dm.prepare_data()
    with pytest.raises(DataError, match="correction"):
        dm.setup("fit")


def test_truncation_is_counted(tmp_path, world, tokenizer):
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), limits=SequenceLimits(max_length=12, max_prompt_length=6))
    assert dm.stats["data/truncated/invert"] > 0
    step = steps(dm, 1)[0]
    assert all(step[c]["input_ids"].shape[1] <= 12 for c in CATEGORIES)


def test_term_table_decides_the_layout_and_what_is_served(tmp_path, world, tokenizer):
    # Plain preference training (DPO) on retained pairs; a category with no term is not served at all.
    terms = {INVERT: None, PUNISH: None, RETAIN: "relational"}
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), terms=terms)
    r = dm.splits[RETAIN][0]
    assert dm.responses(RETAIN, r) == (r.chosen, r.rejected)
    step = steps(dm, 1)[0]
    assert set(step) == {RETAIN} and step[RETAIN]["input_ids"].shape[0] == 2 * B[RETAIN]


def test_no_pair_for_the_training_terms_is_an_error(tmp_path, world, tokenizer):
    source = jsonl_source(tmp_path, world, {INVERT, PUNISH})  # nothing retained
    dm = make_dm(tmp_path, source, tokenizer, None, trust_labels=True, prepare=False,
                 terms={INVERT: None, PUNISH: None, RETAIN: "nll"})
    with pytest.raises(NoConflictsError, match=r"categories that train \(\['retain'\]\)"):
        dm.prepare_data()


def test_conflict_rows_follow_the_weight_index_when_a_category_is_not_served(tmp_path, world, tokenizer):
    # With no term for invert, punish rows keep their place after the inverted pairs in the weight vector.
    dm = make_dm(tmp_path, world, tokenizer, WorldJudge(), terms={INVERT: None, PUNISH: "npo", RETAIN: "kl"})
    n_i = len(dm.splits[INVERT])
    assert n_i and dm.conflict_row(0) == (INVERT, None)
    category, row = dm.conflict_row(n_i)
    assert category == PUNISH and row["index"] == n_i
