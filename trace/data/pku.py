"""PKU-SafeRLHF: loading by hub id or from local files in its schema, and a pi_new built from its labels.

Each row holds a prompt, two responses and, per response, a safety flag, a dict of 19 harm categories
and a severity level (0 safe, 1 minor, 2 moderate, 3 severe), plus which response is better (helpful)
and which is safer. A row becomes a pair {prompt, chosen, rejected} by the preference named in config;
rows that cannot make a pair (an empty or identical response, no preference, a duplicate) are removed
and counted by reason, never dropped silently.

A label policy (policies/pku_*.yaml) gives each harm category the highest severity it tolerates. The
LabelOracle judges a response by its own annotations under such a policy, so PKU can be triaged with
no API; the same policy renders as text for an LLM oracle, so the two can be compared on the same pairs.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from trace_realign.core.records import DataError, PreferencePair
from trace_realign.data.stages import StageCache, file_digest, stage_key
from trace_realign.oracle.base import Oracle, Policy, read_policy_file

log = logging.getLogger(__name__)

HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
HARM_CATEGORIES: tuple[str, ...] = (
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
    "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
    "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm", "Sexual Content",
    "Cybercrime", "Disrupting Public Order", "Environmental Damage", "Psychological Harm",
    "White-Collar Crime", "Animal Abuse",
)
SEVERITY_NAMES = {0: "safe", 1: "minor", 2: "moderate", 3: "severe"}
PREFERENCES = ("better", "safer")
REQUIRED_COLUMNS = ("prompt", "response_0", "response_1")
POLICY_DIR = Path(__file__).parent / "policies"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# -- labels --
@dataclass(frozen=True)
class HarmLabels:
    """One response's annotations; None where the row does not say."""

    safe: bool | None
    harms: tuple[str, ...] | None  # the categories flagged true; None when the dict is missing
    severity: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"safe": self.safe, "harms": None if self.harms is None else list(self.harms), "severity": self.severity}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HarmLabels":
        harms = d.get("harms")
        return cls(d.get("safe"), None if harms is None else tuple(harms), d.get("severity"))


def as_int(value: Any) -> int | None:
    """An integer field as an int (parquet may hold 1.0 where JSON held 1); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def read_labels(row: Mapping[str, Any], k: int) -> HarmLabels:
    """Response k's labels; a value of the wrong type counts as missing (its verdict may be undecided)."""
    safe = row.get(f"is_response_{k}_safe")
    harm = row.get(f"response_{k}_harm_category")
    severity = as_int(row.get(f"response_{k}_severity_level"))
    harms = tuple(sorted(c for c, flagged in harm.items() if flagged is True)) if isinstance(harm, dict) else None
    ok_severity = severity is not None and 0 <= severity <= 3
    return HarmLabels(safe if isinstance(safe, bool) else None, harms, severity if ok_severity else None)


def load_label_policy(path_or_name: str | Path) -> Policy:
    """A label policy YAML: default_max_severity and per-category max_severity (0 to 3)."""
    source, data = read_policy_file(path_or_name, POLICY_DIR)
    if not isinstance(data, dict):
        raise DataError(source, None, None, "expected a mapping")

    def severity(value: Any, field: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3:
            raise DataError(source, None, field, f"expected a severity 0-3, got {value!r}")
        return value

    default = severity(data.get("default_max_severity"), "default_max_severity")
    overrides = data.get("max_severity") or {}
    if not isinstance(overrides, dict):
        raise DataError(source, None, "max_severity", "expected a mapping of harm category -> severity")
    unknown = [c for c in overrides if c not in HARM_CATEGORIES]
    if unknown:
        raise DataError(source, None, "max_severity", f"unknown harm categories {unknown}; expected some of {list(HARM_CATEGORIES)}")
    thresholds = {c: severity(overrides.get(c, default), f"max_severity.{c}") for c in HARM_CATEGORIES}
    name = str(data.get("name", Path(source).stem))
    rules = {"kind": "harm_labels", "default_max_severity": default, "max_severity": thresholds}
    return Policy(name=name, text=render_label_policy(name, str(data.get("description", "")), default, thresholds), rules=rules)


def render_label_policy(name: str, description: str, default: int, thresholds: Mapping[str, int]) -> str:
    """The label policy as text for a language-model oracle: the same rule, in words."""
    def tolerated(n: int) -> str:
        return "no harm at all" if n == 0 else f"harm up to {SEVERITY_NAMES[n]} severity"

    lines = [f"Policy {name}. {description}".strip(), "",
             "A response that causes no harm complies. A harmful response complies only if, for every harm "
             "category it falls in, its severity (minor, moderate or severe) is within what that category "
             "tolerates:",
             f"- every category not listed below: {tolerated(default)}"]
    lines += [f"- {c}: {tolerated(n)}" for c, n in thresholds.items() if n != default]
    return "\n".join(lines)


def label_verdict(labels: HarmLabels, policy: Policy) -> bool | None:
    """Compliance of an annotated response under a label policy; None when the labels do not decide.

    Missing labels are resolved only where every value they could take gives the same verdict: a missing
    harm dict means any category, a missing severity of a harmful response any of 1-3.
    """
    thresholds: Mapping[str, int] = policy.rules["max_severity"]
    default: int = policy.rules["default_max_severity"]
    safe = labels.safe
    if safe is None:
        if labels.severity is not None:
            safe = labels.severity == 0
        elif labels.harms:
            safe = False
    if safe is None:
        return None
    if safe:
        return True
    cats = labels.harms or None  # harmful with no category flagged: the category is unknown
    limits = [thresholds.get(c, default) for c in cats] if cats else list(thresholds.values())
    lo, hi = min(limits), max(limits)
    if not cats:
        # the response falls in some category we do not know: it complies if it complies in all of them
        if labels.severity is not None:
            return True if labels.severity <= lo else (False if labels.severity > hi else None)
        return True if lo >= 3 else (False if hi == 0 else None)
    if labels.severity is not None:
        return labels.severity <= lo
    return True if lo >= 3 else (False if lo == 0 else None)


class LabelOracle(Oracle):
    """Judges responses by the dataset's own annotations (`oracle=labels`): no API, no cost.

    It knows the responses of the data source it is bound to; a response it has no labels for (a model's
    generation, for instance) is undecided, and so is a response whose copies carry conflicting labels.
    """

    judges_text = False  # it cannot score a model's generations: evaluation needs another judge

    def __init__(self) -> None:
        self.source: Any = None
        self._index: dict[tuple[str, str], HarmLabels | None] | None = None

    def bind(self, source: Any) -> None:
        if not hasattr(source, "response_labels"):
            raise ValueError(f"oracle=labels needs a dataset with response annotations (e.g. dataset=pku_saferlhf); "
                             f"{type(source).__name__} has none")
        self.source, self._index = source, None

    def fingerprint(self) -> str:
        return "labels-v1"

    def index(self) -> dict[tuple[str, str], HarmLabels | None]:
        if self._index is None:
            if self.source is None:
                raise RuntimeError("LabelOracle used before bind(source)")
            index: dict[tuple[str, str], HarmLabels | None] = {}
            for key, labels in self.source.response_labels():
                if key in index and index[key] != labels:
                    index[key] = None  # two annotations disagree: the labels cannot decide
                elif key not in index:
                    index[key] = labels
            self._index = index
        return self._index

    def judge(self, prompt: str, response: str, policy: Policy) -> bool | None:
        if policy.rules.get("kind") != "harm_labels":
            raise ValueError(f"oracle=labels judges label policies (policies/pku_*.yaml); {policy.name!r} is not one")
        labels = self.index().get((prompt, response))
        return None if labels is None else label_verdict(labels, policy)


# -- loading --
def local_files(path: str | Path, split: str) -> list[Path]:
    """A file, or the files of a directory named for the split (train.jsonl, data/x/train.jsonl,
    train-00000-of-00001.parquet), in a stable order."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in FILE_FORMATS:
            raise DataError(str(path), None, None, f"unsupported file type; expected one of {sorted(FILE_FORMATS)}")
        return [path]
    if not path.is_dir():
        raise DataError(str(path), None, None, "dataset.path: no such file or directory")
    files = sorted(f for f in path.rglob("*") if f.suffix in FILE_FORMATS and f.is_file()
                   and (f.stem == split or f.stem.startswith(f"{split}-")))
    if not files:
        found = sorted(f.name for f in path.rglob("*") if f.suffix in FILE_FORMATS)[:10]
        raise DataError(str(path), None, None, f"no {split!r} files (expected {split}.jsonl, {split}.json or "
                                               f"{split}-*.parquet); found {found}")
    kinds = {FILE_FORMATS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise DataError(str(path), None, None, f"mixes file formats {sorted(kinds)} for split {split!r}")
    return files


def load_rows(
    hub_id: str, path: str | None, config: str | None, split: str, revision: str | None, cache_dir: str | None
) -> tuple[list[dict[str, Any]], str, str]:
    """(rows, a fingerprint of their content, a name for messages) from local files or the hub. The rows
    are a `datasets.Dataset`: read one at a time from Arrow, never all held as Python objects at once."""
    import datasets

    if path:
        files = local_files(path, split)
        fmt = FILE_FORMATS[files[0].suffix]
        name = str(path)
        fingerprint = "files:" + ",".join(file_digest(f) for f in files)
        try:
            ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)
        except Exception as exc:  # Arrow reports type clashes and bad JSON in many shapes
            raise DataError(name, None, None, f"could not be read as {fmt}: {str(exc)[:300]}") from exc
    else:
        name = f"{hub_id}[{config or 'default'}/{split}]@{revision or 'latest'}"
        try:
            ds = datasets.load_dataset(hub_id, name=config, split=split, revision=revision, cache_dir=cache_dir)
        except Exception as exc:
            raise DataError(name, None, None, f"could not be loaded from the hub ({str(exc)[:300]}); without network, "
                                              "set dataset.path to local files in the same schema") from exc
        fingerprint = f"hub:{name}:{ds._fingerprint}"
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(name, None, missing[0], f"missing column(s) {missing}; PKU-SafeRLHF rows need {list(REQUIRED_COLUMNS)}")
    return ds, fingerprint, name


def hf_cache(cache_dir: str | None) -> str | None:
    """Where `datasets` keeps what it downloads and converts: inside the project's cache when one is set."""
    return str(Path(cache_dir) / "hf") if cache_dir else None


@dataclass
class PkuLocation:
    """Where PKU-SafeRLHF rows come from: local files (`path`) or the hub (id, config, split, revision)."""

    hub_id: str = HUB_ID
    path: str | None = None
    config: str | None = "default"
    split: str = "train"
    revision: str | None = None

    def inputs(self, hf_cache: str | None) -> tuple[str, Any]:
        """(a fingerprint of the rows' content, the rows if reading the fingerprint loaded them). Local
        files are hashed without being parsed, so a cached stage never parses them."""
        if self.path:
            return "files:" + ",".join(file_digest(f) for f in local_files(self.path, self.split)), None
        rows, fingerprint, _ = self.load(hf_cache)
        return fingerprint, rows

    def load(self, hf_cache: str | None) -> tuple[Any, str, str]:
        return load_rows(self.hub_id, self.path, self.config, self.split, self.revision, hf_cache)


def iter_rows(ds: Any, batch_size: int = 4096) -> Iterable[dict[str, Any]]:
    """A dataset's rows as dicts, read from Arrow a batch at a time (fast, and memory stays bounded)."""
    for batch in ds.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def build_pairs(
    rows: Iterable[Mapping[str, Any]], name: str, prefer: str = "safer", dedupe: bool = True,
    columns: Sequence[str] | None = None,
) -> tuple[list[PreferencePair], Counter, list[dict[str, Any]]]:
    """Pairs by the preference `prefer`, with removals counted by reason and listed by row."""
    if prefer not in PREFERENCES:
        raise ValueError(f"dataset.prefer: {prefer!r}; expected one of {PREFERENCES}")
    column = f"{prefer}_response_id"
    if columns is None:
        rows = list(rows)
        columns = sorted({k for r in rows for k in r})
    if column not in columns:
        raise DataError(name, None, column, f"missing column; needed for dataset.prefer={prefer}")
    pairs: list[PreferencePair] = []
    removed: Counter = Counter()
    removed_rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    for i, row in enumerate(rows):
        prompt, r0, r1 = _text(row.get("prompt")), _text(row.get("response_0")), _text(row.get("response_1"))
        pref = as_int(row.get(column))
        if prompt is None:
            reason = "empty_prompt"
        elif r0 is None or r1 is None:
            reason = "empty_response"
        elif r0.strip() == r1.strip():
            reason = "identical_responses"
        elif pref not in (0, 1):
            reason = "no_preference"
        else:
            chosen, rejected = (r0, r1) if pref == 0 else (r1, r0)
            if dedupe and (prompt, chosen, rejected) in seen:
                reason = "duplicate"
            else:
                seen.add((prompt, chosen, rejected))
                k_w, k_l = pref, 1 - pref
                meta = {
                    "row": i,
                    "prompt_source": row.get("prompt_source"),
                    "chosen_source": row.get(f"response_{k_w}_source"),
                    "rejected_source": row.get(f"response_{k_l}_source"),
                    "labels_chosen": read_labels(row, k_w).to_dict(),
                    "labels_rejected": read_labels(row, k_l).to_dict(),
                }
                other = as_int(row.get("better_response_id" if prefer == "safer" else "safer_response_id"))
                if other in (0, 1):
                    meta["preferences_agree"] = other == pref
                pairs.append(PreferencePair(prompt, chosen, rejected, meta={k: v for k, v in meta.items() if v is not None}))
                continue
        removed[reason] += 1
        removed_rows.append({"row": i, "reason": reason})
    return pairs, removed, removed_rows


@dataclass
class PkuSafeRLHF(PkuLocation):
    """The PKU-SafeRLHF data source: pairs under pi_old (its own preferences), label policies, cached.
    Where its rows come from are PkuLocation's fields (hub_id, path, config, split, revision)."""

    prefer: str = "safer"
    num_samples: int | None = 20000
    dedupe: bool = True
    policy_old: str = "pku_old"
    policy_new: str = "pku_new"
    cache_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prefer not in PREFERENCES:
            raise ValueError(f"dataset.prefer: {self.prefer!r}; expected one of {PREFERENCES}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"dataset.num_samples must be >= 1 or null, got {self.num_samples}")
        self.old, self.new = load_label_policy(self.policy_old), load_label_policy(self.policy_new)
        self.cache = StageCache(Path(self.cache_dir) / "stages" if self.cache_dir else None)
        self._pairs: list[PreferencePair] | None = None
        self.stats: dict[str, Any] = {}
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        self.train_pairs()
        assert self._fingerprint is not None
        return self._fingerprint

    def train_pairs(self) -> list[PreferencePair]:
        if self._pairs is not None:
            return self._pairs
        fingerprint, rows = self.inputs(hf_cache(self.cache_dir))
        key = stage_key("pku", inputs=fingerprint, prefer=self.prefer, num_samples=self.num_samples,
                        dedupe=self.dedupe, seed=self.seed)

        def build() -> tuple[list[PreferencePair], dict[str, Any]]:
            nonlocal rows
            name = self.hub_id
            if rows is None:
                rows, _, name = self.load(hf_cache(self.cache_dir))
            pairs, removed, removed_rows = build_pairs(iter_rows(rows), name, self.prefer, self.dedupe,
                                                       columns=rows.column_names)
            if self.num_samples is not None and len(pairs) > self.num_samples:
                keep = set(random.Random(f"{self.seed}:sample").sample(range(len(pairs)), self.num_samples))
                removed["not_sampled"] += len(pairs) - self.num_samples
                pairs = [p for i, p in enumerate(pairs) if i in keep]
            elif self.num_samples is not None and len(pairs) < self.num_samples:
                log.warning("dataset.num_samples=%d but only %d pairs remain after cleaning; using them all",
                            self.num_samples, len(pairs))
            stats = {"data/rows": len(rows), **{f"data/removed/{k}": v for k, v in sorted(removed.items())},
                     "data/pairs": len(pairs), "removed_rows": removed_rows}
            return pairs, stats

        self._pairs, self.stats = self.cache.run("pku", key, build)
        self._fingerprint = f"pku:{key}"
        return self._pairs

    def data_stats(self) -> dict[str, Any]:
        self.train_pairs()
        return dict(self.stats)

    def eval_prompts(self) -> list[dict[str, Any]]:
        return []  # held-out prompts come from the test split the DataModule cuts (data.splits)

    def corpus(self) -> list[str]:
        return [t for p in self.train_pairs() for t in (p.prompt, p.chosen, p.rejected)]

    def response_labels(self) -> Iterable[tuple[tuple[str, str], HarmLabels]]:
        for p in self.train_pairs():
            for response, field in ((p.chosen, "labels_chosen"), (p.rejected, "labels_rejected")):
                if field in p.meta:
                    yield (p.prompt, response), HarmLabels.from_dict(p.meta[field])
