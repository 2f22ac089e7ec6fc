"""Preference records: the one schema every stage reads and writes, validated at the door.

A record is {prompt, chosen, rejected}; after triage it also carries `category` (invert, punish or
retain) and, where an oracle wrote one, `correction` (y_c). A held-out evaluation prompt is {prompt} with
optional `axis`, `category`, `shift`, `kind`, `expects` and `answer` (EVAL_FIELDS). Bad input fails
before any training with a message naming the file, the record index and the field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

INVERT, PUNISH, RETAIN = "invert", "punish", "retain"
CATEGORIES: tuple[str, ...] = (INVERT, PUNISH, RETAIN)
TEXT_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
# The optional fields of an evaluation prompt and the values each may take (None: any non-empty string).
# TPA is reported per axis, category and shift; `kind` tells value prompts (judged against the policies)
# from utility prompts (judged right or wrong); `expects` says what pi_new asks of the model on the prompt
# (the attack success rate is measured on the prompts where it asks for a refusal); `answer` is a utility
# prompt's gold answer, which the capability evaluator's exact match compares with what the model says.
EVAL_FIELDS: dict[str, tuple[str, ...] | None] = {
    "axis": None,
    "category": CATEGORIES,
    "shift": ("shifted", "unchanged"),
    "kind": ("value", "utility"),
    "expects": ("refusal", "answer"),
    "answer": None,
}


class DataError(ValueError):
    """Malformed input, located by source, record index and field."""

    def __init__(self, source: str, index: int | None, field_name: str | None, problem: str):
        where = source
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {problem}")
        self.source, self.index, self.field, self.problem = source, index, field_name, problem


@dataclass
class PreferencePair:
    """(x, y_w, y_l) with its triage outcome; `meta` carries dataset-specific extras (axis, ground truth)."""

    prompt: str
    chosen: str
    rejected: str
    category: str | None = None
    correction: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None and v != {}}


def _text(obj: dict, key: str, source: str, index: int, required: bool = True) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(source, index, key, "missing")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(source, index, key, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(source, index, key, "empty text")
    return value


def validate_record(obj: Any, source: str, index: int, require_category: bool = False) -> PreferencePair:
    """Turn one raw JSON object into a PreferencePair or raise DataError naming what is wrong."""
    if not isinstance(obj, dict):
        raise DataError(source, index, None, f"expected a JSON object, got {type(obj).__name__}")
    prompt, chosen, rejected = (_text(obj, k, source, index) for k in TEXT_FIELDS)
    category = obj.get("category")
    if category is None:
        if require_category:
            raise DataError(source, index, "category", "missing (this dataset is declared triaged)")
    elif not isinstance(category, str) or category not in CATEGORIES:
        raise DataError(source, index, "category", f"unknown category {category!r}; expected one of {list(CATEGORIES)}")
    correction = _text(obj, "correction", source, index, required=False)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise DataError(source, index, "meta", f"expected an object, got {type(meta).__name__}")
    return PreferencePair(prompt, chosen, rejected, category, correction, dict(meta))  # type: ignore[arg-type]


LAYOUTS = ("trace", "reference")


def _message_text(value: Any) -> Any:
    """A chat message list as the reference reads it (its last assistant turn, else every content joined);
    anything else as it is."""
    if not isinstance(value, list):
        return value
    turns = [t for t in value if isinstance(t, dict)]
    for turn in reversed(turns):
        if turn.get("role") == "assistant":
            return turn.get("content")
    return " ".join(str(t.get("content", "")) for t in turns)


def from_reference_layout(obj: Any, source: str, index: int) -> Any:
    """A record of the reference implementation's files (its datagen's pku_dpo_gold.json and splits/trace/)
    in this package's layout. There the category is upper case and an inverted pair is stored already
    swapped (chosen is pi_new's winner); here an inverted pair keeps its old annotation (chosen is what
    pi_old preferred) and the method's term table does the inverting, so it is swapped back, once."""
    if not isinstance(obj, dict):
        return obj
    out = {k: _message_text(v) if k in TEXT_FIELDS else v for k, v in obj.items()}
    category = obj.get("category")
    if category is None:
        raise DataError(source, index, "category", "missing (dataset.layout=reference needs each record's category "
                                                   "to know which pairs its files store swapped)")
    if isinstance(category, str):
        out["category"] = category.lower()
    if out["category"] == INVERT:
        out["chosen"], out["rejected"] = out.get("rejected"), out.get("chosen")
    return out


def read_json_records(path: str | Path) -> list[Any]:
    """Read a .json (list of objects) or .jsonl file; unreadable files raise DataError."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, None, "file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(source, None, None, f"unreadable: {exc}") from exc
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(source, len(rows), None, f"invalid JSON on line {lineno + 1}: {exc.msg}") from exc
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(source, None, None, f"invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, list):
        raise DataError(source, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def load_pairs(path: str | Path, require_category: bool = False, layout: str = "trace") -> list[PreferencePair]:
    """Load and validate every record of a .json/.jsonl file, written in this package's layout or in the
    reference implementation's (from_reference_layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"dataset.layout: {layout!r}; expected one of {list(LAYOUTS)}")
    rows = read_json_records(path)
    if not rows:
        raise DataError(str(path), None, None, "no records")
    if layout == "reference":
        rows = [from_reference_layout(r, str(path), i) for i, r in enumerate(rows)]
    return [validate_record(r, str(path), i, require_category) for i, r in enumerate(rows)]


def validate_eval_prompt(obj: Any, source: str, index: int) -> dict[str, str]:
    """One evaluation prompt: a non-empty `prompt` and the optional EVAL_FIELDS; any other key (a pair's
    chosen and rejected, for instance) is ignored."""
    if not isinstance(obj, dict):
        raise DataError(source, index, None, f"expected a JSON object, got {type(obj).__name__}")
    item = {"prompt": _text(obj, "prompt", source, index)}
    for key, allowed in EVAL_FIELDS.items():
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(source, index, key, f"expected a non-empty string, got {value!r}")
        if allowed is not None and value not in allowed:
            raise DataError(source, index, key, f"unknown {key} {value!r}; expected one of {list(allowed)}")
        item[key] = value
    return item  # type: ignore[return-value]


def load_eval_prompts(path: str | Path) -> list[dict[str, str]]:
    """Load and validate the held-out prompts of a .json/.jsonl file (see validate_eval_prompt)."""
    rows = read_json_records(path)
    if not rows:
        raise DataError(str(path), None, None, "no records")
    return [validate_eval_prompt(r, str(path), i) for i, r in enumerate(rows)]


def save_pairs(pairs: Iterable[PreferencePair], path: str | Path) -> None:
    """Write records as JSON lines (write then rename, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)


def split_by_category(pairs: Sequence[PreferencePair]) -> dict[str, list[PreferencePair]]:
    """D_I, D_II, D_R of Algorithm 1 (lines 1-7), keyed by category name."""
    out: dict[str, list[PreferencePair]] = {c: [] for c in CATEGORIES}
    for i, p in enumerate(pairs):
        if p.category not in out:
            raise DataError("triaged records", i, "category", f"not triaged (got {p.category!r})")
        out[p.category].append(p)
    return out
