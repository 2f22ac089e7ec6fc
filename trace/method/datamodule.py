"""The LightningDataModule that serves triaged splits.

The DataModule runs the data stages once (prepare_data, rank 0 only: triage, split, subset, noise;
data/pipeline.py), then serves every training step one batch of each non-empty category:
B_I ~ D_I, B_P ~ D_II, B_R ~ D_R (Algorithm 1, line 23).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from trace_realign.core.records import CATEGORIES, INVERT, PUNISH, RETAIN, DataError, PreferencePair, load_pairs
from trace_realign.core.sequences import SequenceLimits, encode_pair, pad_batch
from trace_realign.data.pipeline import (
    EVAL_FILE,
    TRIAGE_METRICS_FILE,
    TRIAGED_FILE,
    DataPlan,
    Stages,
    prepare,
    read_jsonl,
)
from trace_realign.data.sources import DataSource, NoConflictsError
from trace_realign.data.stages import StageCache
from trace_realign.method.objective import CONFLICT, TERM_RESPONSES, TRACE_TERMS, ObjectiveConfig
from trace_realign.oracle.base import Oracle

log = logging.getLogger(__name__)


def launched_as_rank_zero() -> bool:
    """Whether this process is the first of its job (a DDP launcher sets these for the workers it starts)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StepStream(IterableDataset):
    """An endless stream of steps; each step is a dict category -> padded batch.

    Within a category the samples are drawn without replacement until it is exhausted, then reshuffled
    (epochs per category), so every pair is seen equally often whatever the category sizes.

    `start` batches of this rank's stream were consumed before (a resumed run): the stream continues
    with batch `start`, its draws replayed without collating. Each DataLoader worker has its own
    generator and the loader takes their batches in turn, so resumed worker w plays the part of the
    worker that would have produced batch start + w.
    """

    def __init__(self, rows: Mapping[str, list[dict[str, Any]]], batch_size: Mapping[str, int], pad_id: int, seed: int,
                 start: int = 0):
        self.rows, self.batch_size, self.pad_id, self.seed, self.start = rows, batch_size, pad_id, seed, start

    def __iter__(self) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        rank, _ = _rank_and_world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker, skip = (self.start + worker) % workers, (self.start + worker) // workers
        rng = random.Random(f"{self.seed}:{rank}:{worker}")
        orders: dict[str, list[int]] = {c: [] for c in self.rows}
        for _ in range(skip):
            self._draw(rng, orders)
        while True:
            yield {cat: collate([self.rows[cat][i] for i in picked], self.pad_id)
                   for cat, picked in self._draw(rng, orders).items()}

    def _draw(self, rng: random.Random, orders: dict[str, list[int]]) -> dict[str, list[int]]:
        """One step's row numbers per category (the generator's draws are the stream's whole state)."""
        step = {}
        for cat, rows in self.rows.items():
            if not rows:
                continue
            picked = []
            while len(picked) < min(self.batch_size[cat], len(rows)):
                if not orders[cat]:
                    orders[cat] = rng.sample(range(len(rows)), len(rows))
                picked.append(orders[cat].pop())
            step[cat] = picked
        return step


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack encoded rows: pair rows give [first responses; second responses], retain rows their one."""
    seqs = [r["first"] for r in rows] + [r["second"] for r in rows if "second" in r]
    batch = pad_batch(seqs, pad_id)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    return batch


class TriagedDataModule(L.LightningDataModule):
    """Triages a data source with an oracle and serves the invert / punish / retain splits."""

    def __init__(
        self,
        source: DataSource,
        oracle: Oracle | None,
        tokenizer: Any,
        work_dir: str | Path,
        batch_size: Mapping[str, int],
        limits: SequenceLimits = SequenceLimits(),
        use_triage: bool = True,
        terms: Mapping[str, str | None] | None = None,
        weighted: Sequence[str] = CONFLICT,
        untriaged: str = PUNISH,
        trust_labels: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        plan: DataPlan | None = None,
        cache_dir: str | Path | None = None,
    ):
        super().__init__()
        missing = [c for c in CATEGORIES if c not in batch_size]
        if missing:
            raise ValueError(f"data.batch_size: missing sizes for {missing}")
        if any(int(batch_size[c]) < 1 for c in CATEGORIES):
            raise ValueError(f"data.batch_size: every size must be >= 1, got {dict(batch_size)}")
        self.source, self.oracle, self.tokenizer = source, oracle, tokenizer
        self.work_dir = Path(work_dir)
        self.batch_size = {c: int(batch_size[c]) for c in CATEGORIES}
        self.limits, self.use_triage = limits, use_triage
        objective = ObjectiveConfig(terms=terms if terms is not None else TRACE_TERMS, weighted=tuple(weighted))
        self.objective_terms, self.needs_corrections = objective.terms, objective.needs_corrections
        # the categories whose pairs carry per-sample weights, in order (their rows are indexed across them)
        self.weighted = objective.weighted
        self.untriaged = untriaged  # checked by Stages (pipeline.py)
        self.trust_labels, self.seed, self.num_workers = trust_labels, seed, num_workers
        self.plan = plan or DataPlan()
        # data stages are cached under cache_dir/stages (none given: every stage is built afresh)
        self.cache_dir = Path(cache_dir) / "stages" if cache_dir is not None else None
        self.splits: dict[str, list[PreferencePair]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.stats: dict[str, float] = {}
        self.start = 0  # batches this rank's stream served before a checkpoint it resumes from
        self._prepared = False

    # -- the data stages, once, on rank 0 (pipeline.py) --
    def prepare_data(self) -> None:
        if self._prepared:
            return
        if not launched_as_rank_zero() and (self.work_dir / TRIAGE_METRICS_FILE).is_file():
            # A DDP worker started after rank 0 prepared this run's data (rundir.claim guarantees the
            # folder holds this configuration's run): read it, do not rebuild it under rank 0's feet.
            self._prepared = True
            return
        stages = Stages(StageCache(self.cache_dir), use_triage=self.use_triage, trust_labels=self.trust_labels,
                        corrections=self.needs_corrections, seed=self.seed, untriaged=self.untriaged)
        prepare(self.source, self.oracle, self.plan, stages, self.work_dir)
        self._prepared = True
        # before any model work: a run with nothing to re-align stops here
        self.check_trainable(load_pairs(self.work_dir / TRIAGED_FILE, require_category=True))

    def eval_prompts(self) -> list[dict[str, Any]]:
        """The held-out prompts: the eval split's, or the data source's own."""
        path = self.work_dir / EVAL_FILE
        return read_jsonl(path) if path.is_file() else self.source.eval_prompts()

    # -- tokenised splits on every rank --
    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        pairs = load_pairs(self.work_dir / TRIAGED_FILE, require_category=True)
        self.stats = json.loads((self.work_dir / TRIAGE_METRICS_FILE).read_text())
        self.check_trainable(pairs)
        self.splits = {c: [p for p in pairs if p.category == c] for c in CATEGORIES}
        for cat, term in self.objective_terms.items():
            if term is not None and "correction" in TERM_RESPONSES[term]:
                lacking = [i for i, p in enumerate(self.splits[cat]) if not p.correction]
                if lacking:
                    raise DataError(str(self.work_dir / TRIAGED_FILE), lacking[0], "correction",
                                    f"term {term!r} needs a correction for every {cat} pair ({len(lacking)} lack one)")
        truncated = Counter()
        # weighted rows are numbered across the weighted categories (index into the module's weights)
        offset, n = {c: 0 for c in CATEGORIES}, 0
        for cat in self.weighted:
            offset[cat], n = n, n + len(self.splits[cat])
        for cat in CATEGORIES:
            self.rows[cat] = []
            if self.objective_terms[cat] is None:
                continue  # a category no term uses is not served
            for i, p in enumerate(self.splits[cat]):
                row: dict[str, Any] = {"index": offset[cat] + i}
                for slot, response in zip(("first", "second"), self.responses(cat, p)):
                    row[slot], cut = self._encode(p.prompt, response)
                    truncated[cat] += cut
                self.rows[cat].append(row)
        self.stats.update({f"data/truncated/{c}": truncated[c] for c in CATEGORIES})
        if sum(truncated.values()):
            log.warning("truncated sequences to data.max_length: %s", dict(truncated))
        if not self.splits[RETAIN]:
            log.warning("no retained pairs: the KL anchor has nothing to hold on to")

    def steps_for_epochs(self, epochs: float, processes: int = 1) -> int:
        """Optimizer steps that serve `epochs` passes over the pairs the terms train (each step takes a batch
        of every served category, on each of `processes` processes): ceil(epochs x pairs / pairs per step).
        Categories are drawn apart (Algorithm 1, line 23), so a small category is seen more often than once
        per epoch and a large one as often as its share allows; the count of pairs served is an epoch's."""
        if epochs <= 0:
            raise ValueError(f"data.epochs must be positive, got {epochs}")
        sizes = {c: len(self.splits[c]) for c in CATEGORIES if self.objective_terms[c] is not None and self.splits[c]}
        per_step = sum(min(self.batch_size[c], n) for c, n in sizes.items()) * processes
        return max(1, math.ceil(epochs * sum(sizes.values()) / per_step))

    def check_trainable(self, pairs: list[PreferencePair]) -> None:
        """Stop if no pair falls in a category that a term trains: there is nothing to re-align."""
        counts = Counter(p.category for p in pairs)
        training = [c for c, t in self.objective_terms.items() if t not in (None, "kl")]
        if any(counts[c] for c in training):
            return
        shown = {c: counts[c] for c in CATEGORIES}
        if set(training) <= {INVERT, PUNISH}:
            raise NoConflictsError(f"triage found no pair to invert or punish among {len(pairs)} pairs ({shown}); "
                                   "pi_new changes nothing this data can teach")
        raise NoConflictsError(f"no pair in the categories that train ({training}) among {len(pairs)} pairs ({shown})")

    def responses(self, category: str, p: PreferencePair) -> tuple[str, ...]:
        """The responses of a pair in the row order of its category's term (objective.TERM_RESPONSES)."""
        return tuple(getattr(p, name) for name in TERM_RESPONSES[self.objective_terms[category]])

    def _encode(self, prompt: str, response: str) -> tuple[tuple[list[int], list[int]], bool]:
        ids, labels, truncated = encode_pair(self.tokenizer, prompt, response, self.limits)
        return (ids, labels), truncated

    def encode_triples(self, triples: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        """A stacked relational batch [winners; losers] for gold triples (prompt, winner, loser)."""
        rows = [{"index": -1, "first": self._encode(x, w)[0], "second": self._encode(x, l)[0]} for x, w, l in triples]
        return collate(rows, self.tokenizer.pad_token_id)

    def conflict_row(self, k: int) -> tuple[str, dict[str, Any] | None]:
        """Category and encoded row of weighted sample k (numbered across `weighted`: invert, then punish,
        for TRACE); the row is None when no term trains that category."""
        category, i = self._locate(k)
        return category, (self.rows[category][i] if self.rows[category] else None)

    def selection_prompts(self, n: int) -> list[str]:
        """A seeded sample of n distinct training prompts (every category) for choosing when to stop."""
        prompts = sorted({p.prompt for c in CATEGORIES for p in self.splits[c]})
        return random.Random(f"{self.seed}:select").sample(prompts, min(n, len(prompts)))

    def conflict_pair(self, k: int) -> PreferencePair:
        category, i = self._locate(k)
        return self.splits[category][i]

    def _locate(self, k: int) -> tuple[str, int]:
        for category in self.weighted:
            if k < len(self.splits[category]):
                return category, k
            k -= len(self.splits[category])
        raise IndexError(f"weighted sample {k} out of range ({self.num_conflicts})")

    @property
    def num_conflicts(self) -> int:
        """The number of weighted samples (the conflict set, for TRACE)."""
        return sum(len(self.splits[c]) for c in self.weighted)

    def train_dataloader(self) -> DataLoader:
        stream = StepStream(self.rows, self.batch_size, self.tokenizer.pad_token_id, self.seed, start=self.start)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    # -- a checkpoint's position in the stream (resume.py) --
    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: every optimizer step consumed accumulate_grad_batches batches of each
        rank's stream (checkpoints are written at step boundaries), and the rows it draws from."""
        trainer = self.trainer
        return {"batches": trainer.global_step * trainer.accumulate_grad_batches,
                "rows": {c: len(r) for c, r in self.rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rows = {c: len(r) for c, r in self.rows.items()}
        if state["rows"] != rows:
            where = getattr(self.trainer, "ckpt_path", None) or "the checkpoint"
            raise ValueError(f"{where} was written for a stream over {state['rows']} rows, this run serves {rows}: "
                             f"it is another run's state; delete {where} to start afresh")
        self.start = int(state["batches"])
