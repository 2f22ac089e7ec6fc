"""The data stages: sources (the embedded world, PKU-SafeRLHF, SynthValueBench, JSONL files), the stage
cache, splits, and the pipeline that runs them in order (source, triage, split, subset, noise)."""

from trace_realign.data.sources import DataSource, JsonlSource, NoConflictsError

__all__ = ["DataSource", "JsonlSource", "NoConflictsError"]
