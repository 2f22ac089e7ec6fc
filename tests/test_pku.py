"""PKU-SafeRLHF: the exact schema from local files, awkward rows counted, label policies and the label oracle."""

from __future__ import annotations

import json

import pytest
from pku_fixture import awkward_rows, regular_rows, row, write_jsonl, write_parquet

from trace_realign.core.records import DataError
from trace_realign.data.pku import (
    HARM_CATEGORIES,
    HarmLabels,
    LabelOracle,
    PkuSafeRLHF,
    build_pairs,
    label_verdict,
    load_label_policy,
    read_labels,
)
from trace_realign.oracle.base import Policy

NEW = load_label_policy("pku_new")
OLD = load_label_policy("pku_old")


def test_nineteen_harm_categories():
    assert len(HARM_CATEGORIES) == 19 == len(set(HARM_CATEGORIES))


@pytest.mark.parametrize("labels, expected", [
    (HarmLabels(True, (), 0), True),
    (HarmLabels(False, ("Violence",), 1), True),            # minor harm tolerated by default
    (HarmLabels(False, ("Violence",), 2), False),
    (HarmLabels(False, ("Privacy Violation",), 1), False),  # forbidden at any severity under pku_new
    (HarmLabels(False, ("Copyright Issues",), 2), True),    # allowed up to moderate under pku_new
    (HarmLabels(False, ("Copyright Issues", "Violence"), 2), False),  # every flagged category must allow it
    (HarmLabels(False, ("Privacy Violation",), None), False),  # no severity, but none is tolerated
    (HarmLabels(False, ("Violence",), None), None),         # no severity, threshold 1: cannot tell
    (HarmLabels(False, None, 3), False),                    # no harm dict, severe: above every threshold
    (HarmLabels(False, None, 1), None),                     # no harm dict, minor: some categories allow it
    (HarmLabels(None, None, 0), True),                      # no safety flag, severity 0 says safe
    (HarmLabels(None, ("Violence",), 3), False),
    (HarmLabels(None, None, None), None),
])
def test_label_verdict_decides_only_where_the_labels_do(labels, expected):
    assert label_verdict(labels, NEW) is expected


def test_the_shift_between_the_shipped_policies():
    privacy, copyright = HarmLabels(False, ("Privacy Violation",), 1), HarmLabels(False, ("Copyright Issues",), 2)
    assert label_verdict(privacy, OLD) is True and label_verdict(privacy, NEW) is False      # becomes forbidden
    assert label_verdict(copyright, OLD) is False and label_verdict(copyright, NEW) is True  # becomes allowed
    # the same rule as text for an LLM oracle
    assert "Privacy Violation: no harm at all" in NEW.text and "Copyright Issues: harm up to moderate" in NEW.text
    assert "Privacy Violation" not in OLD.text


def test_label_policy_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("default_max_severity: 1\nmax_severity:\n  Lying: 0\n")
    with pytest.raises(DataError, match="max_severity.*unknown harm categories"):
        load_label_policy(bad)
    bad.write_text("default_max_severity: 1\nmax_severity:\n  Violence: 5\n")
    with pytest.raises(DataError, match="max_severity.Violence.*severity 0-3"):
        load_label_policy(bad)
    bad.write_text("max_severity: {}\n")
    with pytest.raises(DataError, match="default_max_severity"):
        load_label_policy(bad)


def test_integral_floats_read_as_integers():
    r = row("x", "a", "b", safe=(False, True), harms=(("Violence",), ()), severity=(2.0, 0.0), safer=1.0)
    assert read_labels(r, 0) == HarmLabels(False, ("Violence",), 2)
    pairs, removed, _ = build_pairs([r, row("y", "a", "b", safer=True)], "fixture")
    assert pairs[0].chosen == "b" and pairs[0].meta["chosen_source"] == "alpaca3-8b"
    assert removed == {"no_preference": 1}  # a boolean is not a response id


def test_read_labels_treats_wrong_types_as_missing():
    r = row("x", "a", "b", safe=("yes", False), harms=((), ("Violence",)), severity=(7, True))
    assert read_labels(r, 0) == HarmLabels(None, (), None)
    assert read_labels(r, 1) == HarmLabels(False, ("Violence",), None)
    r["response_0_harm_category"] = None
    assert read_labels(r, 0).harms is None


def test_awkward_rows_are_removed_and_counted_by_reason():
    cases = awkward_rows()
    pairs, removed, removed_rows = build_pairs([r for _, r in cases], "fixture", prefer="safer")
    expected = {}
    for outcome, _ in cases:
        if outcome in ("identical_responses", "empty_response", "empty_prompt", "no_preference"):
            expected[outcome] = expected.get(outcome, 0) + 1
    assert dict(removed) == expected
    assert len(pairs) + sum(removed.values()) == len(cases)
    assert sorted(r["row"] for r in removed_rows) == [i for i, (o, _) in enumerate(cases) if o in expected]
    # chosen follows the configured preference; both preferences are kept in meta
    disagree = next(p for p in pairs if p.prompt == "Awkward I?")
    assert disagree.chosen == "COMPLY safe." and disagree.meta["preferences_agree"] is False
    better, _, _ = build_pairs([r for _, r in cases], "fixture", prefer="better")
    assert next(p for p in better if p.prompt == "Awkward I?").chosen == "Violence severe."


def test_duplicates_are_removed_unless_asked_to_keep_them():
    rows = regular_rows(10) + regular_rows(10)[:3]
    pairs, removed, _ = build_pairs(rows, "fixture")
    assert len(pairs) == 10 and removed["duplicate"] == 3
    pairs, removed, _ = build_pairs(rows, "fixture", dedupe=False)
    assert len(pairs) == 13 and not removed


def test_label_oracle_triages_like_the_fixture_says():
    cases = awkward_rows()
    regular = regular_rows(30)
    pairs, _, _ = build_pairs([r for _, r in cases] + regular, "fixture")

    class Source:
        def response_labels(self):
            for p in pairs:
                yield (p.prompt, p.chosen), HarmLabels.from_dict(p.meta["labels_chosen"])
                yield (p.prompt, p.rejected), HarmLabels.from_dict(p.meta["labels_rejected"])

    oracle = LabelOracle()
    oracle.bind(Source())
    from trace_realign.oracle.triage import triage

    result = triage(pairs, oracle, NEW)
    got = {p.prompt: p.category for p in result.pairs}
    for outcome, r in cases:
        if outcome in ("retain", "invert", "punish"):
            assert got[r["prompt"]] == outcome, r["prompt"]
    # the regular rows' texts say "COMPLY" where their labels comply under pku_new (pku_fixture.text)
    from trace_realign.oracle.triage import triage_category

    regular_pairs = [p for p in result.pairs if p.prompt.startswith("Question ")]
    assert len(regular_pairs) == len(regular)
    expected = [triage_category("COMPLY" in p.chosen, "COMPLY" in p.rejected) for p in regular_pairs]
    assert [p.category for p in regular_pairs] == expected and set(expected) == {"invert", "punish", "retain"}
    assert result.excluded == {"undecided": sum(o == "undecided" for o, _ in cases)}  # no call can fail
    # what it has no labels for (a model's generation) is undecided, never compliant
    assert oracle.judge("Awkward H?", "something a model wrote", NEW) is None
    with pytest.raises(ValueError, match="label policies"):
        oracle.judge("Awkward H?", "COMPLY safe one.", Policy("pi_new", "text"))


def test_label_oracle_needs_an_annotated_dataset():
    with pytest.raises(ValueError, match="pku_saferlhf"):
        LabelOracle().bind(object())


def test_conflicting_annotations_of_one_response_are_undecided():
    a = row("Same prompt?", "COMPLY shared reply.", "other one.", safe=(True, False), harms=((), ("Violence",)), severity=(0, 3))
    b = row("Same prompt?", "COMPLY shared reply.", "third one.", safe=(False, False), harms=(("Violence",), ("Violence",)),
            severity=(3, 3))
    pairs, _, _ = build_pairs([a, b], "fixture")

    class Source:
        def response_labels(self):
            for p in pairs:
                yield (p.prompt, p.chosen), HarmLabels.from_dict(p.meta["labels_chosen"])

    oracle = LabelOracle()
    oracle.bind(Source())
    assert oracle.judge("Same prompt?", "COMPLY shared reply.", NEW) is None


def test_source_reads_jsonl_json_and_parquet_dirs_alike(tmp_path):
    rows = regular_rows(40) + [r for _, r in awkward_rows()]
    jl = write_jsonl(rows, tmp_path / "a" / "train.jsonl")
    js = tmp_path / "b.json"
    js.write_text(json.dumps(rows))
    pq_dir = tmp_path / "hub_layout"
    write_parquet(rows[:20], pq_dir / "data" / "Alpaca-7B" / "train-00000-of-00002.parquet")
    write_parquet(rows[20:], pq_dir / "data" / "Alpaca-7B" / "train-00001-of-00002.parquet")
    write_parquet(rows[:5], pq_dir / "data" / "Alpaca-7B" / "test-00000-of-00001.parquet")  # another split
    got = [PkuSafeRLHF(path=str(p), num_samples=None, cache_dir=str(tmp_path / f"cache{i}"))
           for i, p in enumerate((jl, js, pq_dir))]
    texts = [[(p.prompt, p.chosen, p.rejected) for p in s.train_pairs()] for s in got]
    assert texts[0] == texts[1] == texts[2]
    assert got[0].data_stats()["data/rows"] == len(rows)
    assert got[2].data_stats()["data/rows"] == len(rows)  # the test split's file is not read


def test_num_samples_is_a_seeded_sample_counted_as_not_sampled(tmp_path):
    path = write_jsonl(regular_rows(60), tmp_path / "train.jsonl")
    a = PkuSafeRLHF(path=str(path), num_samples=25, cache_dir=str(tmp_path / "c"))
    b = PkuSafeRLHF(path=str(path), num_samples=25, seed=1, cache_dir=str(tmp_path / "c"))
    assert len(a.train_pairs()) == 25 and a.data_stats()["data/removed/not_sampled"] == 35
    assert [p.prompt + p.chosen for p in a.train_pairs()] != [p.prompt + p.chosen for p in b.train_pairs()]


def test_bad_files_fail_with_the_file_and_column_named(tmp_path):
    rows = regular_rows(5)
    for r in rows:
        del r["response_1"]
    path = write_jsonl(rows, tmp_path / "train.jsonl")
    with pytest.raises(DataError, match="train.jsonl.*response_1.*missing column"):
        PkuSafeRLHF(path=str(path), cache_dir=str(tmp_path / "c")).train_pairs()
    other = write_jsonl(regular_rows(5), tmp_path / "x" / "train.jsonl")
    for r in (rows := regular_rows(5)):
        del r["safer_response_id"]
    write_jsonl(rows, other)
    with pytest.raises(DataError, match="safer_response_id"):
        PkuSafeRLHF(path=str(other), cache_dir=str(tmp_path / "c")).train_pairs()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no 'train' files"):
        PkuSafeRLHF(path=str(tmp_path / "y"), cache_dir=str(tmp_path / "c")).train_pairs()
    with pytest.raises(DataError, match="no such file"):
        PkuSafeRLHF(path=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path / "c")).train_pairs()
    broken = tmp_path / "z" / "train.jsonl"
    broken.parent.mkdir()
    broken.write_text('{"prompt": "a", "response_0": "b"\n')
    with pytest.raises(DataError, match="could not be read as json"):
        PkuSafeRLHF(path=str(broken), cache_dir=str(tmp_path / "c")).train_pairs()


def test_without_network_the_hub_error_says_to_use_local_files(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # as on a machine with no network: the libraries read these flags once, at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="set dataset.path"):
        PkuSafeRLHF(hub_id="PKU-Alignment/no-such-dataset-here", cache_dir=str(tmp_path / "c")).train_pairs()


def test_the_source_is_cached_by_file_content(tmp_path):
    path = write_jsonl(regular_rows(30), tmp_path / "train.jsonl")
    cache = str(tmp_path / "c")
    first = PkuSafeRLHF(path=str(path), num_samples=None, cache_dir=cache)
    first.train_pairs()
    assert first.cache.built == ["pku"]
    again = PkuSafeRLHF(path=str(path), num_samples=None, cache_dir=cache)
    assert [p.to_dict() for p in again.train_pairs()] == [p.to_dict() for p in first.train_pairs()]
    assert again.cache.hits == ["pku"] and again.data_stats() == first.data_stats()
    write_jsonl(regular_rows(31), path)  # changed content
    changed = PkuSafeRLHF(path=str(path), num_samples=None, cache_dir=cache)
    assert len(changed.train_pairs()) == 31 and changed.cache.built == ["pku"]
    assert changed.fingerprint() != first.fingerprint()



def test_the_hub_path_reads_a_repository_layout_with_its_configs(tmp_path):
    # PKU-SafeRLHF's repository layout: a README declaring configs over data/<model>/<split>.jsonl. A clone
    # of it (or the hub itself) goes through the same load_dataset(hub_id, name=config, split=...) call.
    repo = tmp_path / "PKU-SafeRLHF"
    rows = regular_rows(30)
    write_jsonl(rows[:20], repo / "data" / "Alpaca-7B" / "train.jsonl")
    write_jsonl(rows[20:], repo / "data" / "Alpaca3-8B" / "train.jsonl")
    write_jsonl(rows[:5], repo / "data" / "Alpaca-7B" / "test.jsonl")
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "  - config_name: default\n    data_files:\n"
        "      - split: train\n        path: [data/Alpaca-7B/train.jsonl, data/Alpaca3-8B/train.jsonl]\n"
        "      - split: test\n        path: [data/Alpaca-7B/test.jsonl]\n"
        "  - config_name: alpaca-7b\n    data_files:\n"
        "      - split: train\n        path: [data/Alpaca-7B/train.jsonl]\n"
        "---\n")
    sizes = {}
    for config, split in (("default", "train"), ("alpaca-7b", "train"), ("default", "test")):
        source = PkuSafeRLHF(hub_id=str(repo), config=config, split=split, num_samples=None,
                             cache_dir=str(tmp_path / "cache"))
        sizes[(config, split)] = len(source.train_pairs())
        assert source.fingerprint().startswith("pku:")
    assert sizes == {("default", "train"): 30, ("alpaca-7b", "train"): 20, ("default", "test"): 5}
