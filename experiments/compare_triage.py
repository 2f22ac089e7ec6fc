"""Compare two triages of the same data, e.g. the label oracle and an LLM judge on PKU-SafeRLHF:

    trace-data dataset=pku_saferlhf oracle=labels hydra.run.dir=runs/labels
    trace-data dataset=pku_saferlhf oracle=openai hydra.run.dir=runs/gpt4o
    python experiments/compare_triage.py runs/labels runs/gpt4o

Reads every split's records (data/splits/trace/*.jsonl) of both runs, matches pairs by content and prints
agreement, Cohen's kappa and the confusion matrix (rows: the first run, columns: the second).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trace_realign.core.records import CATEGORIES, load_pairs
from trace_realign.oracle.triage import triage_agreement


def triaged(run: Path):
    files = sorted((run / "data" / "splits" / "trace").glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{run}: no data/splits/trace/*.jsonl (is it a trace-data or trace-realign run directory?)")
    return [p for f in files for p in load_pairs(f, require_category=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    m = triage_agreement(triaged(args.first), triaged(args.second))
    print(json.dumps({k: v for k, v in m.items() if not k.startswith("confusion/")}, indent=2))
    if m["compared"]:
        print(f"\n{'':>8}" + "".join(f"{c:>8}" for c in CATEGORIES))
        for x in CATEGORIES:
            print(f"{x:>8}" + "".join(f"{int(m[f'confusion/{x}/{y}']):>8}" for y in CATEGORIES))


if __name__ == "__main__":
    main()
