"""Where the probability mass goes when a model is realigned: the embedded world's stances, measured.

    python experiments/likelihood_displacement.py                        # seed 0: dpo_gold and trace
    python experiments/likelihood_displacement.py --methods dpo_gold --steps 400 -- optimizer.lr=3e-5

1. Before any realignment: log pi(stance | x) of every stance the world can write, averaged over held-out
   prompts of each axis, and the entropy of the first response token, under the base model, after M_old's
   SFT stage and under M_old (model.prealign's stages, read from the cache or built).
2. During realignment: each method run with `probe.enabled=true` and no selection; the same stance
   log-probabilities every `--every` steps (probe/*), and the log-probabilities of the responses each
   category trains (train/logps/*), from the run's CSV log.

Writes results.md (the tables), stances.png (log pi(stance | x) against steps, per method and shifted axis)
and each run's folder under --out. Every number comes from the runs it lists; nothing is tuned here.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

STANCES = ("comply", "refuse", "caveat", "neutral")
AXES = ("medical", "politics", "privacy", "risky")
METHODS: dict[str, list[str]] = {
    "dpo_gold": ["method=dpo_gold", "data.dpo_gold_punish=correction"],
    "dpo": ["method=dpo"],
    "trace": [],
    "naive_oracle_dpo": ["method=naive_oracle_dpo"],
    "u2a": ["method=u2a"],
}


def static_table(seed: int, overrides: list[str], work: Path) -> dict[str, dict[str, float]]:
    """log pi(stance | x) and first-token entropy per axis under the base model and after each stage of M_old."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import trace_realign.conf
    from trace_realign.core.sequences import SequenceLimits
    from trace_realign.eval.likelihood import probe, probe_items
    from trace_realign.models.loading import load_for_eval, load_tokenizer, resolve_model_path
    from trace_realign.models.prealign import prealigned_model
    from trace_realign.train import run

    with initialize_config_dir(config_dir=str(Path(trace_realign.conf.__file__).parent), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"seed={seed}", f"paths.output_dir={work}", *overrides])
    source = instantiate(cfg.dataset)
    limits = SequenceLimits(cfg.data.max_length, cfg.data.max_prompt_length)
    base = resolve_model_path(cfg.model, source.corpus(), cfg.paths.cache_dir)
    stages = list(cfg.model.prealign.stages)
    models = {}
    for upto in range(1, len(stages) + 1):  # each prefix of the stages is cached on its own
        sub = OmegaConf.create(OmegaConf.to_container(cfg))
        for name in stages[upto:]:
            del sub.model.prealign.stages[name]
        path, _ = prealigned_model(sub, base, run, source)
        models["base (pretrained)" if upto == 1 else f"after {stages[upto - 1]}"] = path
    models[f"M_old (after {stages[-1]})"] = models.pop(f"after {stages[-1]}")
    items = probe_items(source, source.eval_prompts(), 32)
    out = {}
    for label, path in models.items():
        tok = load_tokenizer(path, cfg.model)
        out[label] = probe(load_for_eval(path, dict(cfg.model)), tok, items, limits)
    return out


def run_method(method: str, seed: int, out: Path, steps: int, every: int, overrides: list[str]) -> Path:
    from trace_realign.core.rundir import RunFailed, launch

    run_dir = out / method / f"seed{seed}"
    job = [f"seed={seed}", "logger=csv", "select.enabled=false", "probe.enabled=true", f"probe.every_n_steps={every}",
           f"trainer.max_steps={steps}", *METHODS[method], *overrides]
    try:
        launch(run_dir, job)
    except RunFailed as exc:
        sys.exit(str(exc))
    return run_dir


def read_log(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged series of the run's CSV log, as (step, value) pairs."""
    series: dict[str, list[tuple[int, float]]] = {}
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if v not in ("", None) and k not in ("step", "epoch"):
                    series.setdefault(k, []).append((int(float(row["step"])), float(v)))
    return series


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def stance_rows(label: str, values: dict[str, float], axes=AXES) -> list[str]:
    return [f"| {label} | {axis} | " + " | ".join(fmt(values.get(f"logp/{axis}/{s}")) for s in STANCES)
            + f" | {values.get(f'entropy_first/{axis}', float('nan')):.3f} |" for axis in axes]


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    axes_shown = ("medical", "politics")
    fig, grid = plt.subplots(len(runs), len(axes_shown), figsize=(9, 2.8 * len(runs)), squeeze=False)
    for i, (method, series) in enumerate(runs.items()):
        for j, axis in enumerate(axes_shown):
            ax = grid[i][j]
            for stance in STANCES:
                pts = series.get(f"probe/logp/{axis}/{stance}", [])
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".", label=stance)
            ax.set_title(f"{method}: {axis}")
            ax.set_xlabel("step")
            ax.set_ylabel("log pi(stance | x)")
            ax.set_ylim(-40, 1)
    grid[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["dpo_gold", "trace"], choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("outputs/likelihood_displacement") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run and for M_old (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    lines = [f"# Likelihood displacement, seed {args.seed}", "",
             f"Overrides: {' '.join(args.overrides) or '(none)'}", "",
             "## Before realignment: mean log pi(stance | x) over 32 held-out prompts per axis (nats), and the first "
             "response token's entropy", "",
             "| model | axis | " + " | ".join(STANCES) + " | H(first token) |", "|---|---|" + "---|" * (len(STANCES) + 1)]
    for label, values in static_table(args.seed, args.overrides, args.out / "static").items():
        lines += stance_rows(label, values)
    runs = {}
    for method in args.methods:
        print(f"{method} ...", flush=True)
        series = read_log(run_method(method, args.seed, args.out, args.steps, args.every, args.overrides))
        runs[method] = series
        steps = [s for s, _ in series.get("probe/logp/medical/comply", [])]
        lines += ["", f"## {method}: log pi(stance | x) on held-out prompts, step 0 → {steps[-1] if steps else '?'} "
                  f"(every {args.every} steps: {args.out / method})", "",
                  "| step | axis | " + " | ".join(STANCES) + " | H(first token) |", "|---|---|" + "---|" * (len(STANCES) + 1)]
        for step in sorted(set(steps[:1] + steps[len(steps) // 2: len(steps) // 2 + 1] + steps[-1:])):
            at = {k[len("probe/"):]: v for k, pts in series.items() if k.startswith("probe/") for s, v in pts if s == step}
            lines += stance_rows(str(step), at, ("medical", "politics"))
        logps = sorted(k for k in series if k.startswith("train/logps/") and not k.endswith("/ratio"))
        if logps:
            lines += ["", "Training responses, mean log pi (first logged step → last):", ""]
            lines += [f"- `{k[len('train/logps/'):]}`: {series[k][0][1]:.1f} → {series[k][-1][1]:.1f}" for k in logps]
    if plot(runs, args.out / "stances.png"):
        lines += ["", f"Plot: {args.out / 'stances.png'}"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (args.out / "results.md").write_text(text)
    (args.out / "series.json").write_text(json.dumps(runs))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
