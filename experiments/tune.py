"""Tune a method on the embedded benchmark's tuning seeds, with the same budget and objective for every method.

    python experiments/tune.py --method trace --jobs 2             # 6 trials on seeds 0-4, two runs at a time
    python experiments/tune.py --method dpo_gold -- data.dpo_gold_punish=keep threads=1

The procedure is the same for every method, declared here before any trial runs:
- the search space: lr (log-uniform), beta (log-uniform) and T_max (trainer.max_steps) for every method,
  plus alpha_KL where the method trains a KL anchor (SPACE); `--trials` trials each, drawn by Optuna's TPE
  sampler with a fixed seed (a well-kept library's search, reproducible);
- the objective: the mean TPA on the shifted axes over the tuning seeds, subject to the unchanged axes'
  mean TPA >= 95 and utility's mean >= M_old's - 2; a trial that breaks a constraint scores its shifted TPA
  minus 100, so every feasible trial ranks above every infeasible one;
- the seeds: 0-4 only (--seeds refuses 5-9, the held-out seeds the benchmark reports on).

Each trial runs `trace-realign` once per seed (its own folder under --out; `--jobs 2` runs two side by side,
each on one CPU thread, which on 2 cores nearly halves the time), measuring TPA and utility (the other
evaluators are off while tuning: TUNING_EVAL); the study is kept in
--out/study.db, so a stopped tuning resumes where it stopped (under the same seeds, T_max choices, sampler
seed, overrides and library versions only: a study of another setup is refused). Writes trials.csv (every
trial: its settings, its per-seed numbers, its objective) and best.yaml (the chosen settings, the objective
and the command that chose them), which goes into config as the method's row of the model's tuned recipes
(model.tuned, read by `recipe=tuned`).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
from pathlib import Path
from typing import Any

HELD_OUT = {5, 6, 7, 8, 9}
# (name, Hydra key, low, high, log) of each continuous setting, and T_max's choices
SPACE: list[tuple[str, str, float, float, bool]] = [
    ("lr", "optimizer.lr", 1e-5, 3e-3, True),
    ("beta", "loss.beta", 0.03, 1.0, True),
]
KL_SPACE = ("alpha_kl", "objective.alpha_kl", 0.01, 3.0, True)
STEPS = [50, 100, 200, 400]
# the objective reads TPA and utility alone: the other evaluators (capability, ASR) are off while tuning
TUNING_EVAL = ["eval.evaluators.capability=null", "eval.evaluators.asr=null"]
UNCHANGED_FLOOR = 95.0
UTILITY_DROP = 2.0


def composed_method(method: str, overrides: list[str]) -> Any:
    """The method's table as a run composes it (its ablation, `-- ablation=no_kl`, applied)."""
    from hydra import compose, initialize_config_dir

    import trace_realign.conf
    from trace_realign.method.ablation import ablate

    with initialize_config_dir(config_dir=str(Path(trace_realign.conf.__file__).parent), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"method={method}", "paths.output_dir=.", *overrides])
    return ablate(cfg).method


def method_trains_kl(method: str, overrides: list[str]) -> bool:
    """Whether the method's retained pairs train a KL anchor with a weight of its own (alpha_KL)."""
    from omegaconf import OmegaConf

    table = composed_method(method, overrides)
    # a method that trains the anchor reads its weight from objective.alpha_kl (conf/method/trace.yaml); one
    # that fixes its own (u2a, ablation=no_kl: 0) has none to tune
    own = OmegaConf.to_container(table, resolve=False)["alpha_kl"]
    return table.terms.retain == "kl" and own == "${objective.alpha_kl}"


def objective_of(runs: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """The declared objective over one trial's runs (one per seed), and the means it reads."""
    mean = lambda k: sum(r[k] for r in runs) / len(runs)  # noqa: E731
    shifted, unchanged = mean("eval/after/tpa/shifted"), mean("eval/after/tpa/unchanged")
    utility, utility_before = mean("eval/after/utility"), mean("eval/before/utility")
    feasible = unchanged >= UNCHANGED_FLOOR and utility >= utility_before - UTILITY_DROP
    parts = {"shifted": shifted, "unchanged": unchanged, "utility": utility, "utility_m_old": utility_before,
             "feasible": float(feasible)}
    return (shifted if feasible else shifted - 100.0), parts


def run_trial(method: str, seeds: list[int], settings: dict[str, Any], folder: Path, overrides: list[str],
              jobs: int) -> list[dict[str, Any]]:
    """One trial: a `trace-realign` run per seed, `jobs` side by side. A failed run is no verdict on the
    settings: the tuning stops and says why."""
    from trace_realign.core.rundir import RunFailed, launch_all

    job = lambda s: [f"method={method}", f"seed={s}", *TUNING_EVAL, *(f"{k}={v}" for k, v in settings.items()),  # noqa: E731
                     *overrides]
    try:
        return launch_all([(folder / f"seed{s}", job(s)) for s in seeds], jobs=jobs)
    except RunFailed as exc:
        sys.exit(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True)
    parser.add_argument("--trials", type=int, default=6, help="the budget every method in model.tuned had")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, nargs="+", default=STEPS, help="T_max's choices")
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (each on one CPU thread)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args(argv)
    if HELD_OUT & set(args.seeds):
        parser.error(f"--seeds {sorted(HELD_OUT & set(args.seeds))}: seeds 5-9 are held out for reporting; tune on 0-4")
    import optuna

    out = args.out or Path("outputs/tune") / args.method
    out.mkdir(parents=True, exist_ok=True)
    space = SPACE + ([KL_SPACE] if method_trains_kl(args.method, args.overrides) else [])
    command = "python experiments/tune.py " + shlex.join(
        [f"--method={args.method}", f"--trials={args.trials}", "--seeds", *map(str, args.seeds), "--steps",
         *map(str, args.steps), f"--sampler-seed={args.sampler_seed}",
         *([f"--jobs={args.jobs}"] if args.jobs > 1 else []), *(["--", *args.overrides] if args.overrides else [])])

    def trial_fn(trial: "optuna.Trial") -> float:
        settings: dict[str, Any] = {key: trial.suggest_float(name, lo, hi, log=log) for name, key, lo, hi, log in space}
        settings["trainer.max_steps"] = trial.suggest_categorical("steps", args.steps)
        runs = run_trial(args.method, args.seeds, settings, out / f"trial{trial.number}", args.overrides, args.jobs)
        value, parts = objective_of(runs)
        for k, v in parts.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("per_seed_shifted", [r["eval/after/tpa/shifted"] for r in runs])
        trial.set_user_attr("kept_m_old", sum(r.get("select/best_step") == 0 for r in runs))
        print(f"trial {trial.number}: {settings} -> {value:.1f} {parts}", flush=True)
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=args.method, direction="maximize", storage=f"sqlite:///{out / 'study.db'}",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
    # A study resumes only under the setup that ran its trials: another one's trials are no evidence here.
    # (the libraries too: under other releases the same settings train to other last bits)
    from trace_realign.core.environment import ARITHMETIC_LIBRARIES, versions

    setup = {"seeds": args.seeds, "steps": args.steps, "sampler_seed": args.sampler_seed, "overrides": args.overrides,
             "libraries": versions(ARITHMETIC_LIBRARIES)}
    stored = study.user_attrs.get("setup")
    if stored is None and study.trials:
        parser.error(f"--out {out}: its study.db holds trials that recorded no setup; pass another --out")
    if stored is not None and stored != setup:
        differ = ", ".join(f"{k}: {stored.get(k)} there, {v} now" for k, v in setup.items() if stored.get(k) != v)
        parser.error(f"--out {out}: its study ran under another setup ({differ}); pass another --out to tune anew")
    study.set_user_attr("setup", setup)
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < args.trials:
        study.optimize(trial_fn, n_trials=args.trials - done)

    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with (out / "trials.csv").open("w", newline="") as fh:
        names = sorted({k for t in trials for k in t.params} | {k for t in trials for k in t.user_attrs})
        w = csv.writer(fh)
        w.writerow(["trial", "objective", *names])
        for t in trials:
            w.writerow([t.number, t.value, *({**t.params, **t.user_attrs}.get(k) for k in names)])
    best = study.best_trial
    keys = {name: key for name, key, *_ in space} | {"steps": "trainer.max_steps"}
    row = {"steps": "max_steps"}  # the row's names in model.tuned (conf/recipe/tuned.yaml reads them)
    lines = [f"# {args.method}, tuned on seeds {', '.join(map(str, args.seeds))} ({len(trials)} trials)",
             f"# chosen by: {command}",
             f"# objective (mean shifted TPA, unchanged >= {UNCHANGED_FLOOR:g}, utility >= M_old - {UTILITY_DROP:g}): "
             f"{best.value:.1f}; feasible: {bool(best.user_attrs['feasible'])}",
             "# as overrides: " + " ".join(f"{keys[k]}={v!r}" for k, v in sorted(best.params.items())),
             "# the model's row (model.tuned, read by recipe=tuned):",
             f"{composed_method(args.method, args.overrides).name}:"]
    lines += [f"  {row.get(k, k)}: {v!r}" for k, v in sorted(best.params.items())]
    (out / "best.yaml").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
