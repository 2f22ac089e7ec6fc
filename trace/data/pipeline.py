"""The data stages, in order, each cached on disk keyed by its inputs (stages.py):

    source    the dataset's pairs (PKU rows cleaned, SynthValueBench written, ...), with removals counted
    triage    categories by the oracle under pi_new (or the dataset's own labels, or none: every pair served
              as the method's `untriaged` category, e.g. dpo, no_triage)
    split     stratified splits by category (data.splits, e.g. train1 / train2 / test)
    subset    the first data.size pairs of the training split's stratified order (nested: 5k < 10k < 20k)
    noise     a seeded fraction data.label_noise of training labels flipped (Table 8; data.noise_style=mixed
              swaps chosen and rejected of half of them instead, as the reference does)

`prepare` runs them and writes, under the run's data/ directory: triaged.jsonl (what trains), eval.jsonl
(held-out prompts), splits/{trace,dpo,dpo_gold}/<split>.jsonl (TRACE records, {prompt, chosen, rejected}
for DPO baselines, and the pairs relabelled under pi_new for DPO-Gold; the training split's files hold what
trains, after subset and noise, so baselines see the same data), relabelled.jsonl (every split's pairs as
the organisation holds them once its policy is pi_new, each tagged with its split: what the next policy
shift triages, with data.splits=given; see relabelled()), removed.jsonl (every source row that made no
pair, with its reason) and triage.json (counts that add up).

An oracle call that failed (rate limited, timed out, unreadable) is no verdict: its pair is excluded from
this run as `triage/excluded/oracle_failed`, and no stage built on it is cached, so the next run asks only
the failed calls again. When more than `oracle.max_failed_fraction` of the pairs failed, the run stops.
A pair the oracle cannot decide is excluded as `triage/excluded/undecided` with a warning; when that is
more than half of the pairs, the oracle cannot read the data and the run stops (check_undecided).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from trace_realign.core.records import CATEGORIES, PUNISH, DataError, PreferencePair, save_pairs
from trace_realign.data.splits import (
    DPO_GOLD_PUNISH,
    NOISE_STYLES,
    category_counts,
    dpo_gold,
    flip_labels,
    nested_subset,
    relabel,
    stratified_split,
)
from trace_realign.data.stages import StageCache, pairs_digest, stage_key
from trace_realign.oracle.base import NoisyOracle, Oracle, OracleFailuresError, failure_summary
from trace_realign.oracle.triage import TriageResult, attach_corrections, triage

log = logging.getLogger(__name__)

TRIAGED_FILE = "triaged.jsonl"
TRIAGE_METRICS_FILE = "triage.json"
EVAL_FILE = "eval.jsonl"
REMOVED_FILE = "removed.jsonl"
RELABELLED_FILE = "relabelled.jsonl"
GIVEN_SPLITS = "given"  # data.splits: every pair's meta.split names its split (a relabelled file's own)


@dataclass
class DataPlan:
    """How triaged data becomes the training set (the `data` config group's split settings)."""

    splits: Mapping[str, int | None] | str | None = None  # null: no split, every triaged pair trains; given: meta.split
    train_split: str = "train"
    eval_split: str | None = None  # a split whose prompts are the held-out evaluation prompts
    size: int | None = None
    label_noise: float = 0.0
    noise_style: str = "category"
    dpo_gold_punish: str = "keep"

    def __post_init__(self) -> None:
        if isinstance(self.splits, str):
            if self.splits != GIVEN_SPLITS:
                raise ValueError(f"data.splits={self.splits!r}: expected a mapping of split -> size, "
                                 f"{GIVEN_SPLITS!r} (each pair's meta.split) or null")
            if self.eval_split == self.train_split:
                raise ValueError("data.eval_split must differ from data.train_split (held-out prompts are never trained on)")
        elif self.splits is not None:
            self.splits = dict(self.splits)
            if self.train_split not in self.splits:
                raise ValueError(f"data.train_split={self.train_split!r} is not one of data.splits {list(self.splits)}")
            if self.eval_split is not None and self.eval_split not in self.splits:
                raise ValueError(f"data.eval_split={self.eval_split!r} is not one of data.splits {list(self.splits)}")
            if self.eval_split == self.train_split:
                raise ValueError("data.eval_split must differ from data.train_split (held-out prompts are never trained on)")
        elif self.eval_split is not None:
            raise ValueError("data.eval_split needs data.splits")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"data.label_noise must be in [0, 1], got {self.label_noise}")
        if self.noise_style not in NOISE_STYLES:
            raise ValueError(f"data.noise_style: {self.noise_style!r}; expected one of {NOISE_STYLES}")
        if self.dpo_gold_punish not in DPO_GOLD_PUNISH:
            raise ValueError(f"data.dpo_gold_punish: {self.dpo_gold_punish!r}; expected one of {DPO_GOLD_PUNISH}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"data.size must be >= 1 or null, got {self.size}")


@dataclass
class Stages:
    """What prepare() needs besides the plan: where to cache and how the method triages."""

    cache: StageCache
    use_triage: bool = True
    trust_labels: bool = False
    corrections: bool = False
    seed: int = 0
    untriaged: str = PUNISH  # without triage, the category every pair is served as (method.untriaged)

    def __post_init__(self) -> None:
        if self.untriaged not in CATEGORIES:
            raise ValueError(f"method.untriaged: {self.untriaged!r}; a method without triage serves every pair as "
                             f"one of {list(CATEGORIES)}")


def source_key(source: Any, pairs: list[PreferencePair]) -> str:
    fingerprint = getattr(source, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else f"pairs:{pairs_digest(pairs)}"


def prepare(source: Any, oracle: Oracle | None, plan: DataPlan, stages: Stages, out: Path) -> dict[str, Any]:
    """Run every stage and write the outputs under `out`; returns the metrics written to triage.json."""
    pairs = source.train_pairs()
    stats = dict(source.data_stats()) if hasattr(source, "data_stats") else {"data/rows": len(pairs), "data/pairs": len(pairs)}
    removed_rows = stats.pop("removed_rows", [])
    metrics: dict[str, Any] = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
    key = source_key(source, pairs)
    # A source built on failed oracle calls (SynthValueBench) serves this run only, and so does all built on it.
    complete = not getattr(source, "partial", False)

    # -- triage --
    needs_oracle = stages.use_triage or plan.splits is not None  # no_triage still splits by the oracle's view
    if stages.trust_labels:
        for i, p in enumerate(pairs):
            if p.category is None:
                raise DataError("dataset", i, "category", "missing, but the dataset is declared triaged")
        triaged, tstats = pairs, {}
    elif not needs_oracle:
        triaged, tstats = [replace(p, category=stages.untriaged) for p in pairs], {}
        key = stage_key("untriaged", upstream=key, category=stages.untriaged)  # stages below cache categories
    else:
        if oracle is None:
            raise ValueError("triage needs an oracle (oracle=...) or a triaged dataset (dataset.triaged=true)")
        policy = source.new
        corrections = stages.corrections and stages.use_triage
        key = stage_key("triage", upstream=key, oracle=oracle.fingerprint(), policy=policy.text,
                        rules=policy.rules, corrections=corrections)

        def run_triage() -> tuple[list[PreferencePair], dict[str, Any]]:
            flipped = oracle.flipped if isinstance(oracle, NoisyOracle) else 0
            failures_before = oracle.failure_counts()
            result = triage(pairs, oracle, policy, corrections=corrections)
            check_failed_fraction(result.excluded["oracle_failed"], len(pairs),
                                  oracle.failure_counts() - failures_before, oracle.max_failed_fraction)
            out_stats = {f"triage/excluded/{k}": v for k, v in sorted(result.excluded.items())}
            if isinstance(oracle, NoisyOracle):
                out_stats["oracle/noise_flipped_triage"] = oracle.flipped - flipped
            return result.pairs, out_stats

        triaged, tstats = stages.cache.run_asking("triage", key, run_triage, oracle, complete)
        complete = complete and "triage" not in stages.cache.unstored
        check_undecided(int(tstats.get("triage/excluded/undecided", 0)), len(pairs), oracle)
    metrics.update(tstats)
    metrics.update({f"triage/{c}": n for c, n in category_counts(triaged).items()})
    if needs_oracle and not stages.trust_labels:
        metrics.update(ground_truth_agreement(triaged))

    # -- split --
    if plan.splits == GIVEN_SPLITS:
        splits = given_splits(triaged, plan)
    elif plan.splits is not None:
        key = stage_key("split", upstream=key, sizes=plan.splits, seed=stages.seed)

        def run_split() -> tuple[list[PreferencePair], dict[str, Any]]:
            parts, unused = stratified_split(triaged, plan.splits, stages.seed)
            tagged = [replace(p, meta={**p.meta, "split": name}) for name, part in parts.items() for p in part]
            return tagged, {"data/split_unused": unused}

        tagged, sstats = stages.cache.run("split", key, run_split, store=lambda: complete)
        metrics.update(sstats)
        splits = {name: [p for p in tagged if p.meta.get("split") == name] for name in plan.splits}
    else:
        splits = {plan.train_split: list(triaged)}
    for name, part in splits.items():
        metrics[f"split/{name}/size"] = len(part)
        metrics.update({f"split/{name}/{c}": n for c, n in category_counts(part).items()})

    # -- subset and noise (training split only) --
    train = splits[plan.train_split]
    if plan.size is not None:
        key = stage_key("subset", upstream=key, split=plan.train_split, size=plan.size, seed=stages.seed)
        train, _ = stages.cache.run("subset", key, lambda: (nested_subset(train, plan.size, stages.seed), {}),
                                    store=lambda: complete)
    if plan.label_noise > 0:
        key = stage_key("noise", upstream=key, p=plan.label_noise, seed=stages.seed, style=plan.noise_style)

        def run_noise() -> tuple[list[PreferencePair], dict[str, Any]]:
            noisy, flipped = flip_labels(train, plan.label_noise, stages.seed, plan.noise_style)
            return noisy, {"data/noise_flipped": flipped}

        train, nstats = stages.cache.run("noise", key, run_noise, store=lambda: complete)
        metrics.update(nstats)
        metrics["data/label_noise"] = plan.label_noise
    judged = train  # the training pairs' verdicts, before a method without triage replaces them
    if not stages.use_triage:
        # A method without triage (dpo, no_triage) serves every training pair as one category.
        train = [replace(p, category=stages.untriaged) for p in train]
    if stages.corrections and stages.use_triage and plan.label_noise > 0 and not stages.trust_labels:
        # Pairs that noise turned into punish have no correction yet: ask for them now, as triage does.
        result = TriageResult(pairs=train)
        attach_corrections(result, oracle, source.new)
        train = result.pairs
        metrics["triage/excluded/correction_failed"] = (
            metrics.get("triage/excluded/correction_failed", 0) + result.excluded["correction_failed"])
        if result.excluded["oracle_failed"]:
            metrics["triage/excluded/oracle_failed"] = (
                metrics.get("triage/excluded/oracle_failed", 0) + result.excluded["oracle_failed"])
    metrics["data/train_pairs"] = len(train)
    metrics.update({f"data/train/{c}": n for c, n in category_counts(train).items()})
    source_cache = getattr(source, "cache", None)
    hits = list(getattr(source_cache, "hits", [])) + stages.cache.hits
    metrics["data/cache_hits"] = len(hits)
    log.debug("data stages read from the cache: %s", hits or "none")  # each stage logs its own line

    # -- outputs --
    out.mkdir(parents=True, exist_ok=True)
    save_pairs(train, out / TRIAGED_FILE)
    if plan.eval_split is not None:
        items = eval_items(splits[plan.eval_split])
    else:
        items = source.eval_prompts()
    _write_jsonl(out / EVAL_FILE, items)
    _write_jsonl(out / REMOVED_FILE, removed_rows)
    write_formats({**splits, plan.train_split: train}, out / "splits", plan.dpo_gold_punish, metrics)
    held = {**splits, plan.train_split: train if stages.use_triage else judged}
    if not (needs_oracle or stages.trust_labels):  # no oracle was asked: every category is a placeholder
        held = {name: [replace(p, category=None) for p in part] for name, part in held.items()}
    save_pairs(relabelled(held), out / RELABELLED_FILE)
    (out / TRIAGE_METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def check_failed_fraction(failed_pairs: int, total: int, reasons: Counter, bound: float) -> None:
    """Stop when more than `bound` of the pairs lost their verdicts to failed calls: too few would be left
    to stand for the data (and a server that fails this often is better asked again later)."""
    if total and failed_pairs / total > bound:
        raise OracleFailuresError(
            f"triage: oracle calls failed for {failed_pairs} of {total} pairs ({failed_pairs / total:.1%}; failed "
            f"calls by reason: {failure_summary(reasons) or 'none counted'}), more than oracle.max_failed_fraction="
            f"{bound}. The answered calls are cached, so a rerun asks only the failed ones again.")


class UndecidedError(ValueError):
    """The oracle could not decide most pairs: it cannot read this data."""


# More than this share of pairs undecided stops the run; any fewer are excluded with a warning.
MAX_UNDECIDED_FRACTION = 0.5


def check_undecided(undecided: int, total: int, oracle: Oracle) -> None:
    """An oracle that cannot decide a pair says so (None), and triage excludes the pair. A few such pairs
    are the data's own (missing labels): a warning with the count. Most of them mean the oracle cannot
    read this data at all (the embedded world's judge on other texts): stop, naming the oracle and the fixes."""
    if not undecided or not total:
        return
    name = type(getattr(oracle, "base", oracle)).__name__
    share = undecided / total
    if share > MAX_UNDECIDED_FRACTION:
        raise UndecidedError(
            f"triage: the oracle in use ({name}) could not decide {undecided} of {total} pairs ({share:.0%}); it "
            "cannot read this data, and training on the rest would misrepresent it. Either give every pair its "
            "category in the file and set dataset.triaged=true, or triage with an oracle that reads any text: "
            "oracle=openai (an OpenAI-compatible judge; oracle.base_url for another server).")
    log.warning("triage: the oracle (%s) could not decide %d of %d pairs (%.1f%%); they are excluded and counted "
                "as triage/excluded/undecided", name, undecided, total, 100 * share)


def eval_items(pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """Held-out prompts (one per distinct prompt), grouped in evaluation by their pair's category."""
    items: dict[str, dict[str, Any]] = {}
    for p in pairs:
        if p.prompt not in items:
            item = {"prompt": p.prompt, "kind": "value", "category": p.category}
            if "axis" in p.meta:
                item["axis"] = p.meta["axis"]
            items[p.prompt] = item
    return list(items.values())


def write_formats(splits: Mapping[str, list[PreferencePair]], root: Path, punish: str, metrics: dict[str, Any]) -> None:
    """Each split as TRACE records, as plain DPO pairs (the preference as annotated) and as DPO-Gold pairs."""
    for name, part in splits.items():
        save_pairs(part, root / "trace" / f"{name}.jsonl")
        save_pairs([PreferencePair(p.prompt, p.chosen, p.rejected) for p in part], root / "dpo" / f"{name}.jsonl")
        gold, left_out = dpo_gold(part, punish)
        save_pairs([PreferencePair(p.prompt, p.chosen, p.rejected) for p in gold], root / "dpo_gold" / f"{name}.jsonl")
        metrics[f"split/{name}/dpo_gold_left_out"] = left_out


def given_splits(pairs: list[PreferencePair], plan: DataPlan) -> dict[str, list[PreferencePair]]:
    """data.splits=given: the splits each pair's meta.split names (a relabelled file keeps the splits of the
    run that wrote it, so held-out prompts stay held out at the next policy shift)."""
    untagged = [p for p in pairs if not p.meta.get("split")]
    if untagged:
        raise ValueError(f"data.splits={GIVEN_SPLITS}: {len(untagged)} of {len(pairs)} pairs have no meta.split, the "
                         f"first with prompt {untagged[0].prompt[:60]!r}; tag every pair's split, or set data.splits")
    splits: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        splits.setdefault(str(p.meta["split"]), []).append(p)
    for role, name in (("train_split", plan.train_split), ("eval_split", plan.eval_split)):
        if name is not None and name not in splits:
            raise ValueError(f"data.{role}={name!r} names no split of the data's meta.split ({sorted(splits)})")
    return splits


def relabelled(splits: Mapping[str, list[PreferencePair]]) -> list[PreferencePair]:
    """Every split's pairs as the organisation holds them once its policy is pi_new: an inverted pair
    swapped; a punished pair with the oracle's correction as its winner where one was written, else kept
    as it is (nothing better is known); a retained pair kept; a pair without a verdict (category None) as
    it was annotated. Untriaged, each tagged with its split and the category it was relabelled from. Of the
    world's metadata only the axis is kept (the rest described the pair before it was relabelled)."""
    out = []
    for name, part in splits.items():
        for p in part:
            held = p if p.category is None else relabel(p, "correction" if p.correction else "keep")
            meta = {"split": name, **({"relabelled_from": p.category} if p.category else {}),
                    **({"axis": p.meta["axis"]} if "axis" in p.meta else {})}
            out.append(PreferencePair(p.prompt, held.chosen, held.rejected, meta=meta))
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def ground_truth_agreement(pairs: list[PreferencePair]) -> dict[str, float]:
    """Where a dataset knows the true category (meta.gt_category), how well triage matched it: accuracy,
    and precision and recall per category (the proxy judge's errors, by kind)."""
    known = [p for p in pairs if "gt_category" in p.meta]
    if not known:
        return {}
    out = {"triage/gt_accuracy": sum(p.category == p.meta["gt_category"] for p in known) / len(known)}
    predicted, actual = Counter(p.category for p in known), Counter(p.meta["gt_category"] for p in known)
    hits = Counter(p.category for p in known if p.category == p.meta["gt_category"])
    for c in CATEGORIES:
        if predicted[c]:
            out[f"triage/gt_precision/{c}"] = hits[c] / predicted[c]
        if actual[c]:
            out[f"triage/gt_recall/{c}"] = hits[c] / actual[c]
    return out
