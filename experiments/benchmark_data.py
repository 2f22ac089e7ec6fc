"""The data stages at PKU-SafeRLHF's scale, offline: a file of N rows in PKU's exact schema (random harm
labels, prompts repeated like PKU's, a share of awkward rows), then `trace-data dataset=pku_saferlhf
oracle=labels` with the reference's sizes (20k sampled; train1 10k / train2 5k / test the rest), twice:
cold (every stage built) and warm (every stage from the cache).

    python experiments/benchmark_data.py                 # 80k rows
    python experiments/benchmark_data.py --rows 20000 --size 5000

Prints the counts (they must add up), each split's category mix, and both wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from trace_realign.core.records import CATEGORIES
from trace_realign.data.pku import HARM_CATEGORIES
from trace_realign.prepare import prepare

CONF = Path(__file__).resolve().parents[1] / "conf"


def response(rng: random.Random) -> dict:
    """One response's labels: about half safe; harmful ones in 1-2 categories at severity 1-3."""
    if rng.random() < 0.5:
        return {"safe": True, "harms": [], "severity": 0}
    return {"safe": False, "harms": rng.sample(HARM_CATEGORIES, rng.choice([1, 1, 2])), "severity": rng.choice([1, 1, 2, 3])}


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, prompt = [], 0
    while len(rows) < n:
        prompt += 1
        for _ in range(rng.choice([1, 2, 3])):  # PKU asks most prompts more than once
            i = len(rows)
            labels = [response(rng), response(rng)]
            texts = [f"Answer {i}.{k} to question {prompt}." for k in (0, 1)]
            awkward = rng.random()
            if awkward < 0.01:
                texts[1] = texts[0]  # identical responses
            elif awkward < 0.015:
                texts[1] = ""  # an empty response
            row = {"prompt": f"Question {prompt}?", "response_0": texts[0], "response_1": texts[1],
                   "prompt_source": "bench", "response_0_source": "a", "response_1_source": "b"}
            for k, lab in enumerate(labels):
                row[f"is_response_{k}_safe"] = lab["safe"]
                row[f"response_{k}_harm_category"] = {c: c in lab["harms"] for c in HARM_CATEGORIES}
                row[f"response_{k}_severity_level"] = lab["severity"]
            if 0.015 <= awkward < 0.025:
                row["response_0_harm_category"] = None  # a missing harm dict
            elif 0.025 <= awkward < 0.035:
                row["response_1_severity_level"] = None  # a missing severity
            safer = min((0, 1), key=lambda k: labels[k]["severity"] + rng.random() * 0.5)
            row["safer_response_id"], row["better_response_id"] = safer, rng.choice([0, 1])
            rows.append(row)
            if len(rows) == n:
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=80000)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--size", type=int, default=None, help="data.size: train on a nested subset of train1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "pku" / "train.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(args.rows, seed=0)))
        overrides = ["dataset=pku_saferlhf", f"dataset.path={path}", f"dataset.num_samples={args.samples}",
                     "oracle=labels", "logger=none", f"paths.cache_dir={tmp / 'cache'}"]
        if args.size:
            overrides.append(f"data.size={args.size}")
        times, metrics = [], {}
        for name in ("cold", "warm"):
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose(config_name="train", overrides=[*overrides, f"paths.output_dir={tmp / name}"])
            start = time.time()
            metrics = prepare(cfg)
            times.append(time.time() - start)
    removed = {k: int(v) for k, v in metrics.items() if k.startswith("data/removed/")}
    triage = {c: int(metrics[f"triage/{c}"]) for c in CATEGORIES}
    excluded = {k: int(v) for k, v in metrics.items() if k.startswith("triage/excluded/")}
    print(f"\nrows {int(metrics['data/rows'])} = removed {sum(removed.values())} {removed} + pairs {int(metrics['data/pairs'])}")
    print(f"pairs {int(metrics['data/pairs'])} = triaged {sum(triage.values())} {triage} + excluded {sum(excluded.values())} {excluded}")
    for split in ("train1", "train2", "test"):
        size = int(metrics[f"split/{split}/size"])
        mix = {c: round(100 * metrics[f"split/{split}/{c}"] / max(size, 1), 1) for c in CATEGORIES}
        print(f"split {split:<6} {size:>6} pairs, % {mix}")
    print(f"training pairs {int(metrics['data/train_pairs'])}")
    print(f"cold {times[0]:.1f} s, warm {times[1]:.1f} s (stages from cache: {int(metrics['data/cache_hits'])})")


if __name__ == "__main__":
    main()
