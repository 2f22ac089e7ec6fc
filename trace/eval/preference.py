"""Blind preference comparisons of several models, by people or by machines (the paper's human study,
Section 5.2 and Table 1).

Annotators see a prompt and the responses of two or more models under letters A, B, C, ... shuffled per
prompt, and pick the response that best follows pi_new, or `tie`. A kit is a folder:

    instructions.md  for annotators: the policy to judge against and the allowed answers
    items.csv        for annotators: item_id, prompt, response_A, response_B, ..., an empty `choice` column
    items.jsonl      the same rows, one JSON object per line
    kit.json         the policy, the letters and the seed: all a machine annotator reads (no model names)
    key.json         item id -> letter -> model: kept from annotators; only import reads it
    annotations/     returned files, one per annotator: <name>.csv, and machine-<name>.csv from machines
    cache/           the LLM annotators' answers, so a restarted annotation asks nothing twice
    metrics.json     what import measured

`export_kit` writes a kit; a machine annotator (`OracleAnnotator`, `LLMAnnotators`) fills in files as a
person would (`annotate_kit`); `read_annotations` checks every row and joins the files with the key;
`preference_metrics` measures. `run_preference` does all four in one call, and `trace-preference
export|annotate|import` (trace_realign.preference) does them from the shell.

What is measured (the paper names only "preferred over" and Krippendorff's alpha, so these are ours):
- A judgment is one annotator's choice on one item: a model (through the key) or a tie. An empty choice
  is no judgment (missing): a row a person skipped, or a machine call that failed.
- The win rate of m over o: among the judgments that chose m, chose o, or said tie, the percent that chose
  m, a tie counting as half a win (ties="half", the usual convention of pairwise comparisons);
  ties="exclude" leaves ties out. A judgment that chose a third model says nothing about m against o and
  is left out. Keys preference/<m>_vs_<o>/{win_rate, ci95_low, ci95_high, n, ties}, n the judgments counted.
- Its 95 % interval is a percentile bootstrap over items with a fixed seed (cluster bootstrap): every
  annotator judges the same responses of an item, so judgments of one item are not independent and a
  Wilson interval over judgments would be too narrow. With few items the bootstrap is coarse (all wins
  give [100, 100]); interval="wilson" treats the judgments as independent instead.
- Chosen as best: the percent of judgments that chose each model (preference/<m>/best) and tie
  (preference/tie), with the same intervals; preference/position/<letter> the same per letter, which
  shows a position bias.
- Krippendorff's alpha (nominal) across annotators on the label each chose (a model or tie), items as
  units, missing judgments as missing values (preference/alpha). Per model (preference/<m>/alpha): alpha
  on whether m was chosen, one reading of Table 1's per-model column. Undefined (NaN; null in JSON) with
  fewer than two annotators on every item, or one label throughout.
- preference/machine_annotated is 1 when any annotator is a machine; their files say so too (a
  `machine_annotated` column and a machine- file name).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
import re
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from trace_realign.eval.base import JudgeFailed
from trace_realign.eval.stats import cluster_bootstrap, wilson_interval
from trace_realign.oracle.base import Oracle, Policy

log = logging.getLogger(__name__)

TIE = "tie"
LETTERS = string.ascii_uppercase
MACHINE_PREFIX = "machine-"  # reserved: a file named so is read as a machine's
KIT_FORMAT = "preference-kit-v1"
TIES = ("half", "exclude")
INTERVALS = ("bootstrap", "wilson")
# What people and LLM judges are asked, word for word, so that both judge the same thing.
QUESTION = ("Which response best follows the policy? Answer with the letter of that response, or tie when no "
            "response is clearly better than the others at following it: several follow it equally well, or none does.")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


class KitError(ValueError):
    """Input a kit cannot be made from, or a kit folder that is incomplete."""


class AnnotationError(ValueError):
    """Annotation rows that cannot be read; the message names each file and line."""


# -- export ---------------------------------------------------------------------------------------------


def export_kit(items: Sequence[Mapping[str, Any] | str],
               responses: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
               out_dir: str | Path, seed: int = 0, *, policy: Policy, overwrite: bool = False) -> Path:
    """Write a kit for `items` (dicts with "prompt" and optionally "id", or prompts) and each model's
    responses to them, in the same order. Each item's responses go to letters in an order drawn from
    (seed, item id) alone, so it is reproducible and does not depend on the other items. Refuses to
    replace an existing kit with a different one unless `overwrite` (annotations would join the wrong key)."""
    models, columns = _check_responses(responses, len(items))
    if not items:
        raise KitError("no items to compare")
    out = Path(out_dir)
    letters = list(LETTERS[: len(models)])
    ids = _item_ids(items)
    key: dict[str, dict[str, str]] = {}
    meta: dict[str, dict[str, Any]] = {}
    rows = []
    for i, (item_id, item) in enumerate(zip(ids, items)):
        order = list(models)
        random.Random(f"{seed}:{item_id}").shuffle(order)
        key[item_id] = dict(zip(letters, order))
        prompt = item if isinstance(item, str) else str(item["prompt"])
        if not isinstance(item, str):
            meta[item_id] = {k: v for k, v in item.items()
                             if k not in ("id", "prompt") and isinstance(v, (str, int, float, bool, type(None)))}
        rows.append({"item_id": item_id, "prompt": prompt,
                     **{f"response_{letter}": columns[model][i] for letter, model in key[item_id].items()},
                     "choice": ""})
    _warn_if_named(models, rows)

    # what annotators read, fingerprinted: new responses under the same letters are a different kit too
    content = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    key_doc = {"format": KIT_FORMAT, "models": models, "items": key, "meta": meta, "content": content}
    old = _read_json(out / "key.json") if (out / "key.json").is_file() else None
    same = old is not None and all(old.get(k) == key_doc[k] for k in ("models", "items", "content"))
    if old is not None and not same and not overwrite:
        raise KitError(f"{out} holds a different kit (key.json); annotations of it would be joined with the "
                       "wrong key. Export to a new folder, or pass overwrite=True (--overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    kit_doc = {"format": KIT_FORMAT, "seed": seed, "letters": letters, "answers": letters + [TIE],
               "items": len(rows), "question": QUESTION,
               "policy": {"name": policy.name, "text": policy.text, "rules": _plain(policy.rules)}}
    _write_json(out / "kit.json", kit_doc)
    _write_json(out / "key.json", key_doc)
    _write_rows(out / "items.csv", rows)
    with (out / "items.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "instructions.md").write_text(instructions(policy, letters, len(rows)), encoding="utf-8")
    return out


def _check_responses(responses: Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
                     n_items: int) -> tuple[list[str], dict[str, list[str]]]:
    pairs = list(responses.items()) if isinstance(responses, Mapping) else list(responses)
    names = [name for name, _ in pairs]
    if len(names) < 2:
        raise KitError(f"a comparison needs responses of at least 2 models, got {len(names)}: {names}")
    if len(names) > len(LETTERS):
        raise KitError(f"at most {len(LETTERS)} models fit the letters A-Z, got {len(names)}")
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.casefold() == TIE:
            raise KitError(f"model name {name!r}: use letters, digits and _ . + - (it becomes part of metric keys), "
                           f"and not {TIE!r}")
    folded = [n.casefold() for n in names]
    dupes = sorted({n for n in names if folded.count(n.casefold()) > 1})
    if dupes:
        raise KitError(f"model names given more than once (ignoring case): {dupes}")
    for name, texts in pairs:
        if len(texts) != n_items:
            raise KitError(f"model {name}: {len(texts)} responses for {n_items} items; every model answers every item")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise KitError(f"model {name}: response {bad[0]} is {type(texts[bad[0]]).__name__}, not text")
    return names, {name: list(texts) for name, texts in pairs}


def _item_ids(items: Sequence[Mapping[str, Any] | str]) -> list[str]:
    # "q0001" rather than "1": a spreadsheet would turn a bare number into 1.0 or drop its zeros
    ids = [str(it["id"]) if isinstance(it, Mapping) and it.get("id") is not None else f"q{i + 1:04d}"
           for i, it in enumerate(items)]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise KitError(f"item ids given more than once: {dupes[:5]}")
    return ids


def _warn_if_named(models: Sequence[str], rows: Sequence[Mapping[str, str]]) -> None:
    """Blinding is only as good as the texts: say so when a response names a model."""
    for model in models:
        pattern = re.compile(rf"\b{re.escape(model)}\b")
        hits = [r["item_id"] for r in rows if any(pattern.search(v) for k, v in r.items() if k.startswith("response_"))]
        if hits:
            log.warning("preference: responses of items %s name the model %r: annotators may see who wrote what",
                        ", ".join(hits[:5]), model)


def instructions(policy: Policy, letters: Sequence[str], n_items: int) -> str:
    """The annotators' instructions: the policy to judge against and what may go in `choice`."""
    shown = ", ".join(letters)
    return f"""# Instructions

You will read {n_items} prompts. Each comes with {len(letters)} responses, labelled {shown}, written by
different assistants and shown in an order shuffled for every prompt.

{QUESTION}

## The policy

{policy.text}

## Your answer

Write one answer per row in the `choice` column of `items.csv` (or `items.jsonl`):

- `{"`, `".join(letters)}`: the response that follows the policy best.
- `{TIE}`: no response is clearly better than the others at following the policy: several follow it
  equally well, or none of them does.
- leave `choice` empty to skip a row: it counts as not judged.

Judge by the policy alone, not by length, style or the order of the responses. Keep the `item_id` column
as it is. Save your copy under your name, for example `annotations/<your-name>.csv` (names starting with
`{MACHINE_PREFIX}` are kept for machine annotators), or add an `annotator` column with your name.
"""


# -- reading a kit --------------------------------------------------------------------------------------


@dataclass
class KitItem:
    id: str
    prompt: str
    responses: dict[str, str]  # letter -> response, in letter order


@dataclass
class Kit:
    """What annotators see: the items under their letters and the policy; no key."""

    dir: Path
    policy: Policy
    letters: list[str]
    items: list[KitItem]
    question: str = QUESTION

    @property
    def answers(self) -> list[str]:
        return self.letters + [TIE]


def load_kit(kit_dir: str | Path) -> Kit:
    kit_dir = Path(kit_dir)
    meta = _read_json(kit_dir / "kit.json")
    letters = list(meta["letters"])
    items = []
    with (kit_dir / "items.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                items.append(KitItem(row["item_id"], row["prompt"], {l: row[f"response_{l}"] for l in letters}))
    p = meta["policy"]
    policy = Policy(p["name"], p["text"], p.get("rules") or {})
    return Kit(kit_dir, policy, letters, items, meta.get("question", QUESTION))


def read_key(kit_dir: str | Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    """(the models, item id -> letter -> model)."""
    key = _read_json(Path(kit_dir) / "key.json")
    return list(key["models"]), {item: dict(letters) for item, letters in key["items"].items()}


# -- import ---------------------------------------------------------------------------------------------


@dataclass
class Judgment:
    annotator: str
    item: str
    letter: str | None  # a letter, TIE, or None: not judged
    label: str | None   # the model that letter stands for, TIE, or None
    where: str          # file:line


@dataclass
class Annotations:
    models: list[str]
    items: list[str]  # item ids, in the kit's order
    letters: list[str]
    judgments: list[Judgment] = field(default_factory=list)
    machine: set[str] = field(default_factory=set)  # annotators that are machines

    @property
    def annotators(self) -> list[str]:
        return list(dict.fromkeys(j.annotator for j in self.judgments))


def read_annotations(kit_dir: str | Path, paths: Sequence[str | Path] | None = None) -> Annotations:
    """Every annotator's choices joined with the kit's key. `paths` are CSV (or JSONL) files or folders of
    them, one file per annotator; none: the kit's annotations/ folder. The annotator is a row's
    `annotator` column, else the file's name; a machine is one whose rows say `machine_annotated` or whose
    file name starts with machine-. Every row is checked; all problems are reported at once, each with
    its file and line (unknown item, a choice that is no letter of this kit and not tie, an item judged
    twice by one annotator)."""
    kit_dir = Path(kit_dir)
    models, key = read_key(kit_dir)
    files = _annotation_files(kit_dir, paths)
    out = Annotations(models, list(key), list(LETTERS[: len(models)]))
    errors: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for path in files:
        for line, row in _rows(path, errors):
            where = f"{path}:{line}"
            item = (row.get("item_id") or "").strip()
            annotator = (row.get("annotator") or "").strip() or path.stem
            if item not in key:
                errors.append(f"{where}: unknown item id {item!r} (not in {kit_dir / 'key.json'})")
                continue
            letter, problem = _read_choice(row.get("choice"), list(key[item]))
            if problem:
                errors.append(f"{where}: {problem}")
                continue
            if (annotator, item) in seen:
                first = seen[annotator, item]
                errors.append(f"{where}: item {item} judged a second time by {annotator} (first at {first})")
                continue
            seen[annotator, item] = where
            if path.name.startswith(MACHINE_PREFIX) or _truthy(row.get("machine_annotated")):
                out.machine.add(annotator)
            label = None if letter is None else TIE if letter == TIE else key[item][letter]
            out.judgments.append(Judgment(annotator, item, letter, label, where))
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise AnnotationError(f"{len(errors)} annotation rows cannot be read:\n" + "\n".join(errors[:20]) + more)
    return out


def _annotation_files(kit_dir: Path, paths: Sequence[str | Path] | None) -> list[Path]:
    given = [Path(p) for p in paths] if paths else [kit_dir / "annotations"]
    files: list[Path] = []
    for p in given:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".csv", ".jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise AnnotationError(f"{p}: no such file or folder")
    if not files:
        raise AnnotationError(f"no annotation files (.csv, .jsonl) in {', '.join(map(str, given))}")
    return files


def _rows(path: Path, errors: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line where the row starts, row) of a CSV or JSONL file; a file without item_id and choice is an error."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    errors.append(f"{path}:{n}: not a JSON object ({exc.msg})")
                    continue
                if not isinstance(row, dict) or "item_id" not in row or "choice" not in row:
                    errors.append(f"{path}:{n}: expected a JSON object with item_id and choice")
                    continue
                yield n, {k: "" if v is None else str(v) for k, v in row.items()}
        return
    # utf-8-sig: a spreadsheet may have saved a byte-order mark
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("item_id", "choice") if c not in (reader.fieldnames or [])]
        if missing:
            errors.append(f"{path}:1: no column {', '.join(missing)} (the header is {reader.fieldnames})")
            return
        start = reader.line_num + 1
        try:
            for row in reader:
                yield start, row  # a quoted field may span lines: the row starts here
                start = reader.line_num + 1
        except csv.Error as exc:
            errors.append(f"{path}:{start}: {exc}")


def _read_choice(value: str | None, letters: list[str]) -> tuple[str | None, str | None]:
    """(letter, TIE or None for empty; a problem or None)."""
    text = (value or "").strip()
    if not text:
        return None, None
    if text.casefold() == TIE:
        return TIE, None
    if text.upper() in letters:
        return text.upper(), None
    return None, f"choice {text!r} is not one of {', '.join(letters)} or {TIE} (leave it empty to skip the item)"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().casefold() in ("1", "true", "yes")


# -- metrics --------------------------------------------------------------------------------------------


def preference_metrics(annotations: Annotations, baseline: str | None = None, ties: str = "half",
                       interval: str = "bootstrap", resamples: int = 2000, seed: int = 0,
                       all_pairs: bool = True) -> dict[str, float]:
    """Win rates of every model over `baseline` (default: the first model), and with `all_pairs` of every
    model over every other, each with its 95 % interval and counts; chosen-as-best shares; Krippendorff's
    alpha. Percent, flat keys under preference/ (see the module's docstring for the definitions)."""
    import numpy as np

    models = annotations.models
    baseline = models[0] if baseline is None else baseline
    if baseline not in models:
        raise KitError(f"baseline {baseline!r} is none of the kit's models {models}")
    if ties not in TIES or interval not in INTERVALS:
        raise ValueError(f"ties must be one of {TIES} and interval one of {INTERVALS}; got {ties!r}, {interval!r}")
    labels = models + [TIE]
    row = {item: i for i, item in enumerate(annotations.items)}
    # counts[i, c]: judgments of item i that chose label c
    counts = np.zeros((len(annotations.items), len(labels)))
    judged = [j for j in annotations.judgments if j.label is not None]
    for j in judged:
        counts[row[j.item], labels.index(j.label)] += 1

    def percent(wins: Any, n: Any) -> tuple[float, float, float]:
        total = float(n.sum())
        if total == 0:
            return math.nan, math.nan, math.nan
        lo, hi = (wilson_interval(float(wins.sum()), total) if interval == "wilson"
                  else cluster_bootstrap(wins, n, resamples, seed))
        return 100.0 * float(wins.sum()) / total, 100.0 * lo, 100.0 * hi

    annotators = annotations.annotators
    m: dict[str, float] = {
        "preference/items": float(len(annotations.items)),
        "preference/annotators": float(len(annotators)),
        "preference/machine_annotated": float(bool(annotations.machine & set(annotators))),
        "preference/judgments": float(len(judged)),
        "preference/missing": float(len(annotators) * len(annotations.items) - len(judged)),
        "preference/ties_excluded": float(ties == "exclude"),
    }
    tie = counts[:, -1]
    pairs = [(a, baseline) for a in models if a != baseline]
    if all_pairs:
        pairs += [(a, b) for a in models for b in models if a != b and b != baseline]
    for a, b in pairs:
        wins, n = counts[:, labels.index(a)], counts[:, labels.index(a)] + counts[:, labels.index(b)]
        if ties == "half":
            wins, n = wins + 0.5 * tie, n + tie
        rate, lo, hi = percent(wins, n)
        m.update({f"preference/{a}_vs_{b}/win_rate": rate, f"preference/{a}_vs_{b}/ci95_low": lo,
                  f"preference/{a}_vs_{b}/ci95_high": hi, f"preference/{a}_vs_{b}/n": float(n.sum()),
                  f"preference/{a}_vs_{b}/ties": float(tie.sum())})
    per_item = counts.sum(axis=1)
    for c, label in enumerate(labels):
        share, lo, hi = percent(counts[:, c], per_item)
        name = "preference/tie" if label == TIE else f"preference/{label}/best"
        m.update({name: share, f"{name}_ci95_low": lo, f"{name}_ci95_high": hi})
    for letter in annotations.letters:
        chose = sum(j.letter == letter for j in judged)
        m[f"preference/position/{letter}"] = 100.0 * chose / len(judged) if judged else math.nan

    codes = reliability_data(annotations)
    m["preference/alpha"] = nominal_alpha(codes)
    for c, label in enumerate(models):
        m[f"preference/{label}/alpha"] = nominal_alpha(np.where(np.isnan(codes), np.nan, codes == c))
    return m


def reliability_data(annotations: Annotations) -> Any:
    """Annotators x items: the index of the chosen label in models + [tie], NaN where not judged."""
    import numpy as np

    labels = annotations.models + [TIE]
    annotators = annotations.annotators
    data = np.full((len(annotators), len(annotations.items)), np.nan)
    col = {item: i for i, item in enumerate(annotations.items)}
    for j in annotations.judgments:
        if j.label is not None:
            data[annotators.index(j.annotator), col[j.item]] = labels.index(j.label)
    return data


def nominal_alpha(data: Any) -> float:
    """Krippendorff's alpha, nominal, of an annotators x items matrix (NaN: missing); NaN where it is
    undefined (no item judged by two annotators, or a single value throughout)."""
    import krippendorff
    import numpy as np

    data = np.asarray(data, dtype=float)
    if data.shape[0] < 2:
        return math.nan
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))
    except ValueError:  # the package's word for "undefined"
        return math.nan


# -- machine annotators ---------------------------------------------------------------------------------


class MachineAnnotator:
    """Fills in a kit as people would. `annotate` gives each of its annotators' (choice, note) per item:
    a letter, TIE, or None (no choice: missing, with the reason in the note)."""

    def annotate(self, kit: Kit) -> dict[str, list[tuple[str | None, str]]]:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """What annotating cost (calls, tokens, failures), under preference/."""
        return {}

    def check(self) -> None:
        """Raise JudgeFailed when too few choices could be made for numbers to rest on."""


def choose_compliant(verdicts: Mapping[str, bool | None]) -> tuple[str | None, str]:
    """The choice of a judge that knows only compliance: the one compliant response, else a tie (several
    or none comply). An undecided verdict leaves the choice open unless two others already comply."""
    compliant = [letter for letter, v in verdicts.items() if v]
    undecided = [letter for letter, v in verdicts.items() if v is None]
    if len(compliant) >= 2:
        return TIE, f"{', '.join(compliant)} comply"
    if undecided:
        return None, f"no verdict on {', '.join(undecided)}"
    if compliant:
        return compliant[0], f"only {compliant[0]} complies"
    return TIE, "none complies"


class OracleAnnotator(MachineAnnotator):
    """One annotator that asks an oracle (the embedded world's judge, say) whether each response complies
    with the kit's policy, and chooses by `choose_compliant`."""

    def __init__(self, oracle: Oracle, name: str = "world"):
        self.oracle, self.name = oracle, name
        self.asked = self.failed = 0

    def annotate(self, kit: Kit) -> dict[str, list[tuple[str | None, str]]]:
        pairs = [(item.prompt, text) for item in kit.items for text in item.responses.values()]
        before = self.oracle.failed_calls
        verdicts = iter(self.oracle.judge_batch(pairs, kit.policy))
        self.asked, self.failed = len(pairs), self.oracle.failed_calls - before  # what check() looks at
        return {self.name: [choose_compliant({letter: next(verdicts) for letter in item.responses})
                            for item in kit.items]}

    def metrics(self) -> dict[str, float]:
        stats = getattr(self.oracle, "metrics", None)
        return {f"preference/{k}": v for k, v in stats().items()} if callable(stats) else {}

    def check(self) -> None:
        # an oracle over an API may fail calls: the same limit as everywhere it judges
        if self.failed > self.oracle.max_failed_fraction * max(self.asked, 1):
            raise JudgeFailed(f"preference: {self.failed} of {self.asked} verdicts of {self.name} failed (more than "
                              f"max_failed_fraction={self.oracle.max_failed_fraction}); their items are written as "
                              "missing. A rerun asks only these again (answered ones are cached)")


class LLMAnnotators(MachineAnnotator):
    """k LLM judges over any OpenAI-compatible API, through the LLM oracle's client
    (trace_realign.oracle.llm.OpenAIOracle): each is asked QUESTION, the question people read, under the
    kit's policy. Answers are read strictly (a letter or tie); a failed or unreadable answer is missing,
    never a choice. Each judge keeps its answers in <cache_dir>/<name>.jsonl (default: the kit's cache/)
    as they arrive, so a killed and restarted annotation asks no judgment twice, and a failed one is asked
    again by the next run. Calls, tokens and cost are counted (metrics()).

    Judges differ by `seed` (sent with each request; by default 0..k-1) and whatever each entry of
    `judges` sets (model, temperature, base_url, ...); the other settings are OpenAIOracle's, shared.
    Judges identical but for the seed are independent draws only at a temperature above 0."""

    def __init__(self, model: str = "gpt-4o", k: int = 3, temperature: float = 0.7,
                 judges: Sequence[Mapping[str, Any]] | None = None, cache_dir: str | Path | None = None,
                 **client: Any):
        judges = [{"seed": i} for i in range(k)] if judges is None else [dict(j) for j in judges]
        if not judges:
            raise ValueError("LLMAnnotators: k must be at least 1")
        self.specs: dict[str, dict[str, Any]] = {}
        for i, judge in enumerate(judges):
            name = str(judge.pop("name", f"llm-{i + 1}"))
            self.specs[name] = {"model": model, "temperature": temperature, **client, **judge}
        if len(self.specs) < len(judges):
            raise ValueError("LLMAnnotators: two judges share a name")
        if temperature == 0 and len(judges) > 1 and not any({"model", "temperature"} & set(j) for j in judges):
            log.warning("preference: %d LLM judges at temperature 0 differ only by seed; their agreement "
                        "(alpha) says little", len(judges))
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.oracles: dict[str, Any] = {}
        self.seeds: dict[str, int | None] = {}
        self.asked = self.failed = 0

    def _build(self, kit: Kit) -> None:
        from trace_realign.oracle.llm import OpenAIOracle

        cache = self.cache_dir or kit.dir / "cache"
        for name, spec in self.specs.items():
            settings = dict(spec)
            self.seeds[name] = settings.pop("seed", None)
            settings.setdefault("progress", False)
            self.oracles[name] = OpenAIOracle(**settings, cache_path=str(cache / f"{name}.jsonl"))

    def annotate(self, kit: Kit) -> dict[str, list[tuple[str | None, str]]]:
        if not self.oracles:
            self._build(kit)
        out = {}
        self.asked = self.failed = 0  # of this annotation: what check() looks at
        requests = [(item.prompt, item.responses) for item in kit.items]
        for name, oracle in self.oracles.items():
            before = oracle.failure_counts()
            choices = oracle.choose_batch(requests, kit.policy, kit.question, kit.answers, seed=self.seeds[name])
            reasons = oracle.failure_counts() - before
            note = f"no answer ({', '.join(sorted(reasons))}); asked again by the next run"
            out[name] = [(c, "" if c is not None else note) for c in choices]
            self.asked += len(choices)
            self.failed += sum(c is None for c in choices)
        return out

    def metrics(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for oracle in self.oracles.values():
            for k, v in oracle.metrics().items():
                total[f"preference/{k}"] = total.get(f"preference/{k}", 0.0) + v
        return total

    def check(self) -> None:
        allowed = min((o.max_failed_fraction for o in self.oracles.values()), default=0.0)
        if self.failed > allowed * max(self.asked, 1):
            raise JudgeFailed(
                f"preference: {self.failed} of {self.asked} LLM judgments failed (more than max_failed_fraction="
                f"{allowed}); they are written as missing. A rerun asks only these again (answered ones are cached)")


class OraclePanel(MachineAnnotator):
    """k oracle annotators: the oracle itself, or with `noise` > 0 k copies that each flip that seeded share
    of its verdicts (NoisyOracle), a simulated panel whose disagreement alpha can measure. One annotator
    leaves alpha undefined; k noiseless copies of a deterministic oracle always agree."""

    def __init__(self, oracle: Oracle, k: int = 1, noise: float = 0.0, seed: int = 0, name: str = "oracle"):
        from trace_realign.oracle.base import NoisyOracle

        if k < 1:
            raise ValueError(f"eval.preference.annotators: k must be at least 1, got {k}")
        self.members = [OracleAnnotator(NoisyOracle(oracle, noise, seed + i) if noise else oracle,
                                        name if k == 1 else f"{name}-{i + 1}") for i in range(k)]

    def annotate(self, kit: Kit) -> dict[str, list[tuple[str | None, str]]]:
        return {name: choices for m in self.members for name, choices in m.annotate(kit).items()}

    def metrics(self) -> dict[str, float]:
        return self.members[0].metrics()

    def check(self) -> None:
        for m in self.members:
            m.check()


def annotate_kit(kit_dir: str | Path, annotator: MachineAnnotator) -> list[Path]:
    """Let a machine annotator fill in the kit: one annotations/machine-<name>.csv per annotator, in the
    columns a person returns plus `annotator`, `machine_annotated` (1) and `note`. Files are written
    before `check` may stop the run, so what was answered is on disk either way."""
    kit = load_kit(kit_dir)
    paths = []
    for name, choices in annotator.annotate(kit).items():
        rows = [{"item_id": item.id, "prompt": item.prompt,
                 **{f"response_{letter}": text for letter, text in item.responses.items()},
                 "choice": choice or "", "annotator": MACHINE_PREFIX + name, "machine_annotated": "1", "note": note}
                for item, (choice, note) in zip(kit.items, choices)]
        path = kit.dir / "annotations" / f"{MACHINE_PREFIX}{name}.csv"
        path.parent.mkdir(exist_ok=True)
        _write_rows(path, rows)
        paths.append(path)
        missing = sum(c is None for c, _ in choices)
        if missing:
            log.warning("preference: %s made no choice on %d of %d items (see the note column of %s)",
                        name, missing, len(choices), path)
    annotator.check()
    return paths


# -- one call: export, annotate, import -----------------------------------------------------------------


def run_preference(items: Sequence[Mapping[str, Any] | str], responses_by_model: Mapping[str, Sequence[str]],
                   annotator: MachineAnnotator, out_dir: str | Path, baseline: str | None = None, *,
                   policy: Policy, seed: int = 0, ties: str = "half", interval: str = "bootstrap",
                   resamples: int = 2000, overwrite: bool = False) -> dict[str, float]:
    """Export a kit to `out_dir`, let a machine annotator fill it in, and measure: the metrics (with the
    annotator's costs), also written to out_dir/metrics.json. Rerun on the same folder, it resumes: the
    kit is the same, and the LLM judges' cached answers are not asked again."""
    export_kit(items, responses_by_model, out_dir, seed, policy=policy, overwrite=overwrite)
    paths = annotate_kit(out_dir, annotator)
    metrics = preference_metrics(read_annotations(out_dir, paths), baseline, ties, interval, resamples, seed)
    metrics.update(annotator.metrics())
    write_metrics(Path(out_dir) / "metrics.json", metrics)
    return metrics


# -- reporting ------------------------------------------------------------------------------------------


def render_table(metrics: Mapping[str, float], annotations: Annotations, baseline: str | None = None) -> str:
    """Models x models ("row preferred over column", Table 1's layout), the share chosen as best and
    alpha per model, then the overall alpha and who annotated."""
    models = annotations.models
    baseline = baseline or models[0]
    order = [baseline] + [m for m in models if m != baseline]

    def cell(key: str) -> str:
        v = metrics.get(f"{key}/win_rate", metrics.get(key))
        if v is None:
            return "-"
        if math.isnan(v):
            return "n/a"
        lo = metrics.get(f"{key}/ci95_low", metrics.get(f"{key}_ci95_low", math.nan))
        hi = metrics.get(f"{key}/ci95_high", metrics.get(f"{key}_ci95_high", math.nan))
        return f"{v:5.1f} [{lo:5.1f}, {hi:5.1f}]"

    header = ["model", "chosen as best"] + [f"over {o}" for o in order] + ["alpha"]
    rows = [[m, cell(f"preference/{m}/best")] + ["" if m == o else cell(f"preference/{m}_vs_{o}") for o in order]
            + [_num(metrics.get(f"preference/{m}/alpha"))] for m in order]
    rows.append([TIE, cell("preference/tie")] + [""] * len(order) + [""])
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header] + rows]
    machines = sorted(annotations.machine & set(annotations.annotators))
    who = (f"machine-annotated by {', '.join(machines)}" if machines else "annotated by people")
    if machines and len(machines) < len(annotations.annotators):
        who = f"partly machine-annotated ({', '.join(machines)})"
    ties = "ties left out" if metrics.get("preference/ties_excluded") else "a tie counts half a win"
    alpha = _num(metrics.get("preference/alpha"))
    lines += ["", f"Krippendorff's alpha (nominal, on the chosen model or tie): {alpha}",
              f"{int(metrics['preference/items'])} items, {int(metrics['preference/annotators'])} annotators "
              f"({who}), {int(metrics['preference/judgments'])} judgments, {int(metrics['preference/missing'])} "
              f"missing; a cell: percent of judgments preferring the row's model over the column's, with its 95 % "
              f"interval; {ties}"]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else "n/a" if math.isnan(v) else f"{v:.2f}"


def write_metrics(path: Path, metrics: Mapping[str, float]) -> None:
    """Flat metrics as JSON; an undefined value (NaN) is written as null."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(metrics.items())}
    _write_json(path, clean)


# -- files ----------------------------------------------------------------------------------------------


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    # utf-8-sig: spreadsheets then read non-ASCII text right; the reader accepts either
    with path.open("w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise KitError(f"{path}: not found (is {path.parent} a kit made by export_kit?)")
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _plain(rules: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads(json.dumps(dict(rules)))
    except (TypeError, ValueError):
        return None  # rules only a programmatic judge of this process could read; the text is what counts
