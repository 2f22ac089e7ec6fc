"""`trace-data`: the data stages alone (build, triage), on the same configs as `trace-realign`.

    trace-data oracle=openai oracle.model=gpt-4o         # pay for triage once
    trace-realign oracle=openai oracle.model=gpt-4o      # reuses every paid verdict from the cache

Writes data/triaged.jsonl, data/triage.json and metrics.json (triage counts, exclusions and the oracle's
accounting) into its Hydra run directory. Verdicts are cached by content, so the training run that follows
asks the oracle nothing it has already answered. Like `trace-realign`, it claims its folder for its
configuration (rundir.py) and a failure leaves FAILED with the reason there, and no metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trace_realign.core import rundir
from trace_realign.data.pipeline import TRIAGE_METRICS_FILE
from trace_realign.method.ablation import ablate
from trace_realign.method.datamodule import launched_as_rank_zero
from trace_realign.oracle.base import build_oracles
from trace_realign.steps import build_datamodule, print_summary, run_app, write_metrics


def prepare(cfg: DictConfig) -> dict:
    ablate(cfg)  # ablation=no_triage changes what triage serves
    out = Path(cfg.paths.output_dir)
    if launched_as_rank_zero():
        rundir.claim(out, cfg)  # a folder holding another configuration's run stops us here
    source = instantiate(cfg.dataset)
    oracle, _ = build_oracles(cfg.oracle, cfg.seed, source)
    _, datamodule = build_datamodule(cfg, source, oracle, tokenizer=None, out=out)
    datamodule.prepare_data()
    metrics = json.loads((out / "data" / TRIAGE_METRICS_FILE).read_text())
    if hasattr(oracle, "metrics"):
        metrics.update(oracle.metrics())
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    write_metrics(out / "metrics.json", metrics)
    print_summary(out, metrics, name="trace-data")
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://trace_realign.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_app(prepare, cfg, "trace-data")


if __name__ == "__main__":
    main()
