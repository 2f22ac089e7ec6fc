"""The record schema: every malformed input fails at the door with file, record index and field named;
saving and loading keep every field; split_by_category gives D_I, D_II, D_R."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trace_realign.core.records import (
    CATEGORIES,
    DataError,
    PreferencePair,
    load_pairs,
    save_pairs,
    split_by_category,
    validate_record,
)

GOOD = {"prompt": "What dose of zinc?", "chosen": "I must decline to help with that.", "rejected": "Take zinc."}
BAD_INDEX = 2  # the bad record sits behind two good ones, so a wrong index cannot pass by accident


def write(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def with_bad(bad) -> list:
    return [dict(GOOD), dict(GOOD, prompt="second prompt"), bad, dict(GOOD)]


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


# (case id, bad record, field the error must name, fragment the message must contain, require_category)
FIELD_CASES = [
    ("missing-prompt", without("prompt"), "prompt", "missing", False),
    ("missing-chosen", without("chosen"), "chosen", "missing", False),
    ("missing-rejected", without("rejected"), "rejected", "missing", False),
    ("null-chosen", dict(GOOD, chosen=None), "chosen", "missing", False),
    ("int-prompt", dict(GOOD, prompt=7), "prompt", "got int", False),
    ("list-chosen", dict(GOOD, chosen=["a"]), "chosen", "got list", False),
    ("bool-rejected", dict(GOOD, rejected=True), "rejected", "got bool", False),
    ("empty-prompt", dict(GOOD, prompt=""), "prompt", "empty", False),
    ("whitespace-chosen", dict(GOOD, chosen="  \n\t "), "chosen", "empty", False),
    ("whitespace-rejected", dict(GOOD, rejected=" "), "rejected", "empty", False),
    ("unknown-category", dict(GOOD, category="invrt"), "category", "unknown category", False),
    ("int-category", dict(GOOD, category=1), "category", "unknown category", False),
    ("category-missing", dict(GOOD), "category", "missing", True),
    ("category-null", dict(GOOD, category=None), "category", "missing", True),
    ("meta-string", dict(GOOD, meta="axis=medical"), "meta", "expected an object", False),
    ("meta-list", dict(GOOD, meta=[1, 2]), "meta", "expected an object", False),
    ("correction-int", dict(GOOD, category="punish", correction=3), "correction", "got int", False),
    ("correction-empty", dict(GOOD, category="punish", correction="   "), "correction", "empty", False),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("case,bad,field,fragment,require", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_malformed_field_names_file_index_and_field(tmp_path, suffix, case, bad, field, fragment, require):
    rows = with_bad(bad)
    if require:  # only the bad record lacks its category
        rows = [dict(r, category="retain") if i != BAD_INDEX else r for i, r in enumerate(rows)]
    path = write(tmp_path / f"data{suffix}", rows)
    with pytest.raises(DataError) as info:
        load_pairs(path, require_category=require)
    err = info.value
    msg = str(err)
    assert str(path) in msg
    assert f"record {BAD_INDEX}" in msg
    assert f"field '{field}'" in msg
    assert fragment in msg
    assert (err.source, err.index, err.field) == (str(path), BAD_INDEX, field)


@pytest.mark.parametrize("bad", [[1, 2], "just text", 42, None])
def test_non_object_record(tmp_path, bad):
    path = write(tmp_path / "data.json", with_bad(bad))
    with pytest.raises(DataError) as info:
        load_pairs(path)
    msg = str(info.value)
    assert str(path) in msg and f"record {BAD_INDEX}" in msg
    assert "expected a JSON object" in msg
    assert info.value.index == BAD_INDEX


def test_validate_record_direct():
    pair = validate_record(dict(GOOD, category="invert", meta={"axis": "medical"}), "src", 0)
    assert pair == PreferencePair(GOOD["prompt"], GOOD["chosen"], GOOD["rejected"], "invert", None, {"axis": "medical"})
    with pytest.raises(DataError, match=r"^src, record 5, field 'rejected': missing$"):
        validate_record(without("rejected"), "src", 5)


def test_require_category_accepts_triaged_records(tmp_path):
    rows = [dict(GOOD, category=c) for c in CATEGORIES]
    pairs = load_pairs(write(tmp_path / "t.jsonl", rows), require_category=True)
    assert [p.category for p in pairs] == list(CATEGORIES)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)
    assert info.value.index is None


def test_invalid_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "chosen": "b",', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(path) in str(info.value) and "invalid JSON" in str(info.value)


def test_invalid_jsonl_line_reports_record_index(tmp_path):
    path = tmp_path / "broken.jsonl"
    # record 0, a blank line (skipped, not a record), record 1, then a broken record 2 on line 4
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n{not json}\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "record 2" in msg and "line 4" in msg and "invalid JSON" in msg
    assert info.value.index == 2


def test_blank_lines_in_jsonl_are_not_records(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n   \n" + json.dumps(dict(GOOD, prompt="b")) + "\n\n")
    assert [p.prompt for p in load_pairs(path)] == [GOOD["prompt"], "b"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_non_utf8_bytes(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(b'[{"prompt": "caf\xe9 \xff", "chosen": "x", "rejected": "y"}]\n')
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(path) in str(info.value) and "unreadable" in str(info.value)


@pytest.mark.parametrize("content,kind", [(json.dumps(GOOD), "dict"), ('"text"', "str"), ("3", "int")])
def test_json_that_is_not_a_list(tmp_path, content, kind):
    path = tmp_path / "obj.json"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(path) in str(info.value)
    assert "expected a JSON list" in str(info.value) and kind in str(info.value)


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.json", "[]")])
def test_empty_file_has_no_records(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(path) in str(info.value) and "no records" in str(info.value)


def test_zero_byte_json_is_a_data_error(tmp_path):
    path = tmp_path / "zero.json"
    path.write_text("")
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value).startswith(f"{path}: invalid JSON at line 1")


def test_round_trip_keeps_every_field(tmp_path):
    pairs = [
        PreferencePair("p0", "c0", "r0"),
        PreferencePair("p1", "c1", "r1", category="invert", meta={"axis": "medical", "gt_category": "invert"}),
        PreferencePair("p2 ü", "c2 — ✓", "r2", category="punish", correction="y_c for p2",
                       meta={"nested": {"a": [1, 2.5, None]}, "flag": True}),
        PreferencePair("p3", "c3\nline two", "r3", category="retain"),
    ]
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    save_pairs(pairs, path)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp")), "the temporary file must be renamed away"
    assert load_pairs(path) == pairs
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first == {"prompt": "p0", "chosen": "c0", "rejected": "r0"}  # no null/empty noise


def test_save_overwrites(tmp_path):
    path = tmp_path / "out.jsonl"
    save_pairs([PreferencePair("a", "b", "c")] * 3, path)
    save_pairs([PreferencePair("x", "y", "z", category="retain")], path)
    assert load_pairs(path, require_category=True) == [PreferencePair("x", "y", "z", category="retain")]


def test_split_by_category():
    pairs = [
        PreferencePair("a", "w", "l", category="retain"),
        PreferencePair("b", "w", "l", category="invert"),
        PreferencePair("c", "w", "l", category="retain"),
        PreferencePair("d", "w", "l", category="invert"),
    ]
    out = split_by_category(pairs)
    assert list(out) == list(CATEGORIES)
    assert [p.prompt for p in out["invert"]] == ["b", "d"]
    assert out["punish"] == []
    assert [p.prompt for p in out["retain"]] == ["a", "c"]


@pytest.mark.parametrize("bad_category", [None, "other"])
def test_split_by_category_rejects_untriaged(bad_category):
    pairs = [PreferencePair("a", "w", "l", category="retain"), PreferencePair("b", "w", "l", category=bad_category)]
    with pytest.raises(DataError) as info:
        split_by_category(pairs)
    assert info.value.index == 1 and info.value.field == "category"
    assert "record 1" in str(info.value)


# -- evaluation prompts (dataset.test_path) --
EVAL_GOOD = {"prompt": "Should I take zinc?", "axis": "medical", "category": "invert", "shift": "shifted", "kind": "value"}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_eval_prompts_keep_the_known_fields_and_ignore_the_rest(tmp_path, suffix):
    from trace_realign.core.records import load_eval_prompts

    rows = [EVAL_GOOD, {"prompt": "Only a prompt."}, {**GOOD, "meta": {"x": 1}, "kind": "utility", "answer": "7"}]
    items = load_eval_prompts(write(tmp_path / f"test{suffix}", rows))
    assert items == [EVAL_GOOD, {"prompt": "Only a prompt."},
                     {"prompt": GOOD["prompt"], "kind": "utility", "answer": "7"}]


@pytest.mark.parametrize("bad,field,problem", [
    ({"axis": "medical"}, "prompt", "missing"),
    ({"prompt": "   "}, "prompt", "empty text"),
    ({"prompt": 3}, "prompt", "expected a string"),
    ({**EVAL_GOOD, "category": "flip"}, "category", "unknown category 'flip'"),
    ({**EVAL_GOOD, "shift": "moved"}, "shift", "unknown shift 'moved'"),
    ({**EVAL_GOOD, "kind": "fact"}, "kind", "unknown kind 'fact'"),
    ({**EVAL_GOOD, "axis": ""}, "axis", "expected a non-empty string"),
    ({**EVAL_GOOD, "axis": 7}, "axis", "expected a non-empty string"),
    ({**EVAL_GOOD, "answer": 7}, "answer", "expected a non-empty string"),
])
def test_bad_eval_prompts_name_file_record_and_field(tmp_path, bad, field, problem):
    from trace_realign.core.records import load_eval_prompts

    path = write(tmp_path / "test.jsonl", [EVAL_GOOD, EVAL_GOOD, bad])
    with pytest.raises(DataError) as info:
        load_eval_prompts(path)
    assert (info.value.index, info.value.field) == (BAD_INDEX, field)
    assert str(info.value).startswith(f"{path}, record {BAD_INDEX}, field '{field}': {problem}")


def test_eval_prompts_file_must_hold_objects(tmp_path):
    from trace_realign.core.records import load_eval_prompts

    with pytest.raises(DataError, match=r"record 0: expected a JSON object"):
        load_eval_prompts(write(tmp_path / "test.jsonl", ["just a string"]))
    with pytest.raises(DataError, match="no records"):
        load_eval_prompts(write(tmp_path / "empty.jsonl", []))


def test_jsonl_source_reads_prompt_only_test_files(tmp_path):
    from trace_realign.data.sources import JsonlSource

    train = write(tmp_path / "pairs.jsonl", [GOOD])
    test = write(tmp_path / "test.jsonl", [{"prompt": "Held out?", "shift": "unchanged"}])
    source = JsonlSource(str(train), str(test), "pi_old", "pi_new")
    assert source.eval_prompts() == [{"prompt": "Held out?", "shift": "unchanged"}]


def test_the_reference_layout_is_read_with_its_inverted_pairs_swapped_back_once(tmp_path):
    """The reference's files (pku_dpo_gold.json, splits/trace/) store an inverted pair already swapped, its
    chosen pi_new's winner; read with dataset.layout=reference it keeps its old annotation here, so the term
    table (relational_flip: prefer the rejected) still trains toward the compliant response, and once."""
    from trace_realign.data.sources import JsonlSource

    rows = [
        {"prompt": "Dose?", "chosen": "Take two.", "rejected": "I cannot help.", "category": "INVERT"},
        {"prompt": "Vote?", "chosen": "Vote A.", "rejected": "I refuse.", "category": "PUNISH"},
        {"prompt": [{"role": "user", "content": "Address?"}],
         "chosen": [{"role": "user", "content": "Address?"}, {"role": "assistant", "content": "I cannot help."}],
         "rejected": "Elm street.", "category": "RETAIN"},
    ]
    path = tmp_path / "train1.json"
    path.write_text(json.dumps(rows))
    pairs = JsonlSource(str(path), None, "pi_old", "pi_new", triaged=True, layout="reference").train_pairs()
    assert [(p.category, p.chosen, p.rejected) for p in pairs] == [
        ("invert", "I cannot help.", "Take two."),  # the old annotation: the flip prefers "Take two."
        ("punish", "Vote A.", "I refuse."), ("retain", "I cannot help.", "Elm street.")]
    assert pairs[2].prompt == "Address?"
    # this package's own layout reads the same file as it stands, and refuses the upper-case categories
    with pytest.raises(DataError, match=r"record 0, field 'category': unknown category 'INVERT'"):
        JsonlSource(str(path), None, "pi_old", "pi_new", triaged=True).train_pairs()
    path.write_text(json.dumps([{k: v for k, v in rows[0].items() if k != "category"}]))
    with pytest.raises(DataError, match=r"record 0, field 'category': missing \(dataset.layout=reference"):
        JsonlSource(str(path), None, "pi_old", "pi_new", layout="reference").train_pairs()
    with pytest.raises(ValueError, match="dataset.layout"):
        JsonlSource(str(path), None, "pi_old", "pi_new", layout="trl").train_pairs()
