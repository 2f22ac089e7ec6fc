"""The embedded benchmark: M_old, then TRACE with the default config, for several seeds.

    python experiments/benchmark_embedded.py                 # seeds 0 1 2
    python experiments/benchmark_embedded.py --seeds 0 -- ablation=no_kl trainer.max_steps=100

Each seed is one `trace-realign seed=S` run (its world, and so its M_old, is drawn from the seed; M_old is
built on first use and cached). Prints a table of M_old and TRACE per seed and the mean, checks the
acceptance figures, and writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CATEGORIES = ("invert", "punish", "retain")
# (label, metrics.json key under eval/<when>/)
COLUMNS = [
    ("TPA", "tpa"),
    ("TPA shifted", "tpa/shifted"),
    *[(f"TPA {c}", f"tpa/{c}") for c in CATEGORIES],
    ("pi_old agree", "tpa_old"),
    ("unchanged agree", "tpa_old/unchanged"),
    ("utility", "utility"),
]


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    exe = Path(sys.executable).parent / "trace-realign"
    run_dir = out / f"seed{seed}"
    cmd = [str(exe), f"seed={seed}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *overrides]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if res.returncode != 0:
        sys.exit(f"seed {seed} failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["wall_seconds"] = wall
    return metrics


def row(label: str, m: dict, when: str, seconds: float | None) -> list[str]:
    cells = [label] + [f"{m.get(f'eval/{when}/{key}', float('nan')):.1f}" for _, key in COLUMNS]
    return cells + ["" if seconds is None else f"{seconds:.0f}"]


def table(rows: list[list[str]]) -> str:
    header = ["run"] + [c for c, _ in COLUMNS] + ["wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def checks(results: dict[int, dict]) -> list[tuple[str, bool, str]]:
    """The acceptance figures, per seed: (what, passed, the numbers)."""
    out = []
    for seed, m in results.items():
        b, a = (lambda k, w=w: m.get(f"eval/{w}/{k}", float("nan")) for w in ("before", "after"))
        out += [
            (f"seed {seed}: M_old pi_old agreement >= 90", b("tpa_old") >= 90, f"{b('tpa_old'):.1f}"),
            (f"seed {seed}: M_old TPA on shifted axes <= 30", b("tpa/shifted") <= 30, f"{b('tpa/shifted'):.1f}"),
            (f"seed {seed}: TRACE TPA >= M_old + 40 (shifted axes)", a("tpa/shifted") >= b("tpa/shifted") + 40,
             f"{b('tpa/shifted'):.1f} -> {a('tpa/shifted'):.1f}"),
            (f"seed {seed}: TRACE TPA >= M_old + 40 (all axes)", a("tpa") >= b("tpa") + 40, f"{b('tpa'):.1f} -> {a('tpa'):.1f}"),
            (f"seed {seed}: utility within 2 points", abs(a("utility") - b("utility")) <= 2,
             f"{b('utility'):.1f} -> {a('utility'):.1f}"),
            (f"seed {seed}: unchanged-axis agreement within 5 points",
             abs(a("tpa_old/unchanged") - b("tpa_old/unchanged")) <= 5,
             f"{b('tpa_old/unchanged'):.1f} -> {a('tpa_old/unchanged'):.1f}"),
            (f"seed {seed}: trace-realign with M_old cached <= 180 s", m["time/run_seconds"] <= 180,
             f"{m['time/run_seconds']:.0f} s"),
        ]
        if m.get("prealign/cached") == 0.0:
            out.append((f"seed {seed}: building M_old <= 600 s", m["prealign/seconds"] <= 600, f"{m['prealign/seconds']:.0f} s"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_embedded") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")

    results = {}
    for seed in args.seeds:
        print(f"seed {seed} ...", flush=True)
        m = run_seed(seed, args.out, args.overrides)
        # The run's own time without building M_old: what a run with M_old cached costs.
        m["time/run_seconds"] = m["wall_seconds"] - (m.get("prealign/seconds", 0.0) if m.get("prealign/cached") == 0.0 else 0.0)
        results[seed] = m

    rows = []
    for seed, m in results.items():
        rows.append(row(f"M_old s{seed}", m, "before", None))
        rows.append(row(f"TRACE s{seed}", m, "after", m["time/run_seconds"]))
    mean = {k: statistics.fmean(m[k] for m in results.values()) for k in results[args.seeds[0]]
            if all(isinstance(m.get(k), (int, float)) for m in results.values())}
    rows.append(row("M_old mean", mean, "before", None))
    rows.append(row("TRACE mean", mean, "after", mean.get("time/run_seconds")))
    text = table(rows)
    verdicts = checks(results)
    text += "\n\n" + "\n".join(f"- [{'x' if ok else ' '}] {what}: {numbers}" for what, ok, numbers in verdicts)
    builds = [f"seed {s}: {m['prealign/seconds']:.0f} s" for s, m in results.items() if m.get("prealign/cached") == 0.0]
    if builds:
        text += "\n\nM_old built in " + ", ".join(builds)
    print("\n" + text)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({str(s): m for s, m in results.items()}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
