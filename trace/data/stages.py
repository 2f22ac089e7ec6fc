"""On-disk cache of data stages: each stage's output stored as parquet, keyed by everything it read.

A stage key is a hash of the stage's name, its parameters and the keys of the stages it read, so an
unchanged input is reused and any change (a file's bytes, a size, a seed, the oracle, the policy)
rebuilds that stage and every stage after it. A stage is written into a temporary directory that is
renamed into place only when complete: an interrupted write leaves no entry, never a corrupt one.

A stage built on oracle calls of which any failed is used by its run and never stored, nor is any stage
built on it: the next run asks the failed calls again (answered calls come from the oracle's own store).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from trace_realign.core.records import PreferencePair
from trace_realign.oracle.base import failure_summary

log = logging.getLogger(__name__)

STAGE_FORMAT = "stage-v1"
COLUMNS = ("prompt", "chosen", "rejected", "category", "correction", "meta")


def stage_key(name: str, **inputs: Any) -> str:
    """A content hash of a stage's name and inputs (anything JSON can write; sorted, so order-free)."""
    blob = json.dumps([STAGE_FORMAT, name, inputs], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes: a local input is reused only while its content is unchanged."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def pairs_digest(pairs: Iterable[PreferencePair]) -> str:
    """sha256 of records' content, for sources that cannot name their inputs otherwise."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _table(pairs: list[PreferencePair]) -> pa.Table:
    # meta is stored as JSON text: its keys differ from dataset to dataset (and row to row).
    columns = {c: [getattr(p, c) for p in pairs] for c in COLUMNS[:-1]}
    columns["meta"] = [json.dumps(p.meta, ensure_ascii=False) for p in pairs]  # key order kept as built
    schema = pa.schema([(c, pa.string()) for c in COLUMNS])
    return pa.table(columns, schema=schema)


def _pairs(table: pa.Table) -> list[PreferencePair]:
    rows = table.to_pylist()
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r["category"], r["correction"], json.loads(r["meta"]))
            for r in rows]


def _failure_counts(oracle: Any) -> Counter:
    counts = getattr(oracle, "failure_counts", None)
    return counts() if callable(counts) else Counter()


Build = Callable[[], tuple[list[PreferencePair], dict[str, Any]]]


class StageCache:
    """Stages under `root/<name>/<key>/` as data.parquet (the records) and stats.json (their account).
    `unstored` names the stages built for this run only (on failed oracle calls, or on such a stage)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self.hits: list[str] = []
        self.built: list[str] = []
        self.unstored: list[str] = []

    def run(self, name: str, key: str, build: Build, store: Callable[[], bool] = lambda: True
            ) -> tuple[list[PreferencePair], dict[str, Any]]:
        """The stage's (records, stats): read from the cache when `key` is stored, else built and, when
        `store()` says so once it is built, stored."""
        if self.root is None:
            self.built.append(name)
            return build()
        final = self.root / name / key
        if (final / "stats.json").is_file() and (final / "data.parquet").is_file():
            self.hits.append(name)
            log.info("data stage %s: cached (%s)", name, final)
            return _pairs(pq.read_table(final / "data.parquet")), json.loads((final / "stats.json").read_text())
        pairs, stats = build()
        self.built.append(name)
        if not store():
            self.unstored.append(name)
            return pairs, stats
        tmp = self.root / name / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            pq.write_table(_table(pairs), tmp / "data.parquet")
            (tmp / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic: the entry appears whole or not at all
            except OSError:
                if not final.is_dir():  # anything but "another process stored it first"
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return pairs, stats

    def run_asking(self, name: str, key: str, build: Build, oracle: Any, upstream_complete: bool = True
                   ) -> tuple[list[PreferencePair], dict[str, Any]]:
        """run() for a stage that asks `oracle`: stored only when every call it made answered and what it
        read was complete; otherwise it serves this run alone, with a warning, and a rerun asks again."""
        before = _failure_counts(oracle)

        def store() -> bool:
            failed = _failure_counts(oracle) - before
            if failed:
                log.warning("data stage %s: %d oracle calls failed (%s); its result serves this run but is not "
                            "cached, so a rerun asks the failed calls again (answered ones are cached)",
                            name, sum(failed.values()), failure_summary(failed))
            elif not upstream_complete:
                log.info("data stage %s: not cached, as it read a stage built on failed oracle calls", name)
            return upstream_complete and not failed

        return self.run(name, key, build, store)
