"""Every check that only a GPU can make, as one step, into one report (experiments/gpu_check.sh runs it).

    bash experiments/gpu_check.sh                        # one GPU: about 8 minutes; the report in --out
    bash experiments/gpu_check.sh --dry-run              # the same steps at toy sizes on a CPU (the test suite)
    bash experiments/gpu_check.sh --only fsdp1 bf16      # some of them

The checks, each through the code a run uses:

    step     TRACE's step time against DPO's, fused (objective.fused_forward=true: one policy and one
             reference forward a step) and per category (false), on a Llama of 1024 x 8 layers with random
             weights (experiments/benchmark_train.py); the ratio TRACE / DPO of each
    memory   peak memory of LoRA TRACE with its reference (the policy with its adapters off) against the
             policy alone (the same script's trace_lora and policy_lora)
    fsdp1    a whole run under trainer=fsdp1; the same run killed once its first checkpoint is written,
             resumed, and compared with the whole one (every metric but timings, the adapter's bytes)
    impact   both impact methods (loop, batched) against the loop in float64 (experiments/benchmark_impact.py)
    bf16     the default run in bf16-mixed precision: it trains, and its verdict

--dry-run runs each at toy sizes on the CPU: it checks the steps, not the figures (exit code 1 if one errs).
It times the fused step alone (the per-category step is the CPU's default, which every run tests), and its
fsdp1 check kills and resumes one CPU process (FSDP1 needs GPUs; tests/test_resume.py resumes FSDP2 over
two gloo processes). Writes gpu_check.md and
gpu_check.json under --out, and every command's output to gpu_check.log; a check that fails or errs is
reported with its reason and the others still run (exit code 1 if any did).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("step", "memory", "fsdp1", "impact", "bf16")
# modules a check needs beyond what every run imports, with what installs them: a GPU machine's image may lack
# one, and a check should say so before it spends minutes building M_old
NEEDS = {"bf16": {"lm_eval": "lm-eval"}}  # the default run's capability evaluator
# timings, the resume marker and where M_old came from differ by design between a whole and a resumed run
VOLATILE = ("seconds", "train/resumed_from_step", "prealign/cached", "prealign/stages_built", "data/cache_hits")
# few steps of the embedded default, for the runs of the fsdp1 and bf16 checks at toy sizes
TOY_WORLD = ["dataset.pairs_per_axis=8", "dataset.test_prompts_per_axis=2", "dataset.utility_in_data=4",
             "dataset.utility_eval=2", "model.prealign.stages.pretrain.steps=2", "model.prealign.stages.sft.steps=3",
             "model.prealign.stages.dpo.steps=2", "impact.gold_batch_size=6"]
TOY = [*TOY_WORLD, "data.batch_size.invert=2", "data.batch_size.punish=2", "data.batch_size.retain=2",
       "eval.max_new_tokens=4"]


def sh(cmd: list[str], timeout: float, log: Path, **popen: Any) -> subprocess.CompletedProcess:
    """Run `cmd`, its output appended to `log`; a non-zero exit raises with the output's tail."""
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, **popen)
    if res.returncode != 0:
        raise RuntimeError(f"exit {res.returncode}: {' '.join(cmd[:4])} ... (output in {log})\n"
                           + log.read_text()[-1500:])
    return res


def app(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def train_step(args: argparse.Namespace, out: Path, log: Path) -> dict[str, Any]:
    """benchmark_train.py fused and per category: TRACE / DPO step time, and the memory of each."""
    # 40 steps: on an H200 both methods' steps fell into two modes (about 0.15 s and 0.4 s), and the median
    # of 10 took whichever held more of them (experiments/results/gpu_check/gpu_check.md)
    size = ["--smoke"] if args.dry_run else ["--hidden-size", "1024", "--layers", "8", "--batch-size", "8",
                                              "--steps", "40", "--warmup", "5"]
    device = ["--device", "cpu" if args.dry_run else "cuda"]
    found = {}
    for fused in ("true",) if args.dry_run else ("true", "false"):
        report = out / f"train_fused_{fused}"
        sh([sys.executable, "experiments/benchmark_train.py", *device, *size, "--only", "trace_lora", "dpo_lora",
            "policy_lora", "--out", str(report), "--", f"objective.fused_forward={fused}",
            *(TOY_WORLD if args.dry_run else [])], 900, log)
        found[fused] = json.loads(report.with_suffix(".json").read_text())
    return found


def check_step(found: dict[str, Any]) -> dict[str, Any]:
    ratio = {f: r["results"]["trace_lora"]["median_s"] / r["results"]["dpo_lora"]["median_s"] for f, r in found.items()}
    ms = {f: {k: round(1000 * r["results"][k]["median_s"], 1) for k in ("trace_lora", "dpo_lora")} for f, r in found.items()}
    return {"passed": all(v < 1.3 for v in ratio.values()), "limit": "TRACE / DPO < 1.3 (the paper's own cost claim)",
            "trace_over_dpo_fused": ratio["true"], "trace_over_dpo_per_category": ratio.get("false"), "median_ms": ms}


def check_memory(found: dict[str, Any]) -> dict[str, Any]:
    r = found["true"]["results"]
    ratio = r["trace_lora"]["peak_bytes"] / r["policy_lora"]["peak_bytes"]
    return {"passed": ratio < 1.1, "limit": "< 1.1: the reference costs no copy of the model",
            "trace_lora_over_policy": ratio, "trace_lora_mib": r["trace_lora"]["peak_bytes"] / 2**20,
            "policy_lora_mib": r["policy_lora"]["peak_bytes"] / 2**20}


def check_fsdp1(args: argparse.Namespace, out: Path, log: Path) -> dict[str, Any]:
    """A whole run and a killed-and-resumed one under FSDP1 (FSDP2 on gloo in a dry run), compared."""
    strategy = (["trainer.accelerator=cpu", "trainer.devices=1"] if args.dry_run
                else ["trainer=fsdp1", "trainer.devices=1"])
    steps, every = 8, 3
    # FSDP1 scores no impact and selects nothing (trace_realign.method.strategies says why)
    common = [*strategy, *(TOY if args.dry_run else []), "ablation=no_impact", "select.enabled=false",
              f"trainer.max_steps={steps}", f"checkpoint.every_n_steps={every}", "eval.before=false",
              "eval.evaluators.capability=null", "eval.evaluators.asr=null", "logger=none"]
    whole, killed = out / "fsdp_whole", out / "fsdp_killed"
    sh([app("trace-realign"), *common, f"hydra.run.dir={whole}"], 900, log)
    ckpt = killed / "checkpoints" / "last.ckpt"
    with log.open("a") as fh:
        proc = subprocess.Popen([app("trace-realign"), *common, f"hydra.run.dir={killed}"], stdout=fh,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        deadline = time.time() + 600
        while not ckpt.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not ckpt.is_file() or (killed / "metrics.json").exists():
        raise RuntimeError("the run was not killed in mid-training (no checkpoint, or it finished first)")
    sh([app("trace-realign"), *common, f"hydra.run.dir={killed}"], 900, log)

    def kept(folder: Path) -> dict[str, Any]:
        m = json.loads((folder / "metrics.json").read_text())
        return {k: v for k, v in m.items() if not any(w in k for w in VOLATILE)}

    a, b = kept(whole), kept(killed)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    same_adapter = ((whole / "adapter" / "adapter_model.safetensors").read_bytes()
                    == (killed / "adapter" / "adapter_model.safetensors").read_bytes())
    resumed = json.loads((killed / "metrics.json").read_text()).get("train/resumed_from_step")
    return {"passed": not differ and same_adapter and bool(resumed), "strategy": " ".join(strategy),
            "resumed_from_step": resumed, "metrics_that_differ": differ, "same_adapter_bytes": same_adapter,
            "shifted_tpa": a.get("eval/after/tpa/shifted")}


def check_impact(args: argparse.Namespace, out: Path, log: Path) -> dict[str, Any]:
    size = ["--pairs", "16", "--truth-pairs", "8"] if args.dry_run else ["--pairs", "400", "--truth-pairs", "200"]
    device = "cpu" if args.dry_run else "cuda"
    sh([sys.executable, "experiments/benchmark_impact.py", "--device", device, *size, "--out", str(out / "impact")],
       900, log)
    r = json.loads(next((out / "impact").glob("impact_*.json")).read_text())
    worst = max(r["loop_max_rel_error_vs_float64"], r["batched_max_rel_error_vs_float64"])
    return {"passed": bool(r["same_nonzero_weights"]) and r["batched_spearman_vs_float64"] > 0.999,
            "limit": "the same weights kept, Spearman > 0.999 against float64", "device": r["device"],
            **{k: r[k] for k in ("loop_max_rel_error_vs_float64", "batched_max_rel_error_vs_float64",
                                 "loop_error_vs_largest_vs_float64", "batched_error_vs_largest_vs_float64",
                                 "batched_spearman_vs_float64", "speedup")}, "worst_rel_error": worst}


def check_bf16(args: argparse.Namespace, out: Path, log: Path) -> dict[str, Any]:
    where = ["trainer.accelerator=cpu", *TOY, "trainer.max_steps=4"] if args.dry_run else ["trainer=gpu"]
    run = out / "bf16"
    start = time.time()
    sh([app("trace-realign"), *where, "trainer.precision=bf16-mixed", "logger=none", f"hydra.run.dir={run}"], 900, log)
    m = json.loads((run / "metrics.json").read_text())
    return {"passed": m["train/steps"] > 0 and all(v == v for v in m.values() if isinstance(v, float)),
            "seconds": round(time.time() - start, 1), "steps": m["train/steps"],
            "shifted_tpa": (m.get("eval/before/tpa/shifted"), m.get("eval/after/tpa/shifted")),
            "unchanged_tpa": (m.get("eval/before/tpa/unchanged"), m.get("eval/after/tpa/unchanged")),
            "utility": (m.get("eval/before/utility"), m.get("eval/after/utility"))}


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"# GPU checks{' (dry run: toy sizes on a CPU)' if args.dry_run else ''}", "",
             f"`bash experiments/gpu_check.sh{' --dry-run' if args.dry_run else ''}`, {seconds:.0f} s, "
             f"{time.strftime('%Y-%m-%d %H:%M')}, device: {device_name(args)}", "",
             "| check | result | figures |", "|---|---|---|"]
    for name, r in results.items():
        verdict = "error" if "error" in r else "passed" if r.get("passed") else "failed"
        figures = r.get("error") or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in r.items() if k != "passed")
        lines.append(f"| {name} | {verdict} | {figures.splitlines()[0] if figures else ''} |")
    return "\n".join(lines) + "\n"


def missing_modules(check: str) -> dict[str, str]:
    """The modules `check` needs that this Python cannot import, each with the distribution that holds it."""
    import importlib.util

    return {m: dist for m, dist in NEEDS.get(check, {}).items() if importlib.util.find_spec(m) is None}


def device_name(args: argparse.Namespace) -> str:
    if args.dry_run:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on a CPU: the steps, not the figures")
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "gpu_check")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no GPU here: run it where one is, or --dry-run")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    start, results, found = time.time(), {}, None
    others: dict[str, Callable[..., dict[str, Any]]] = {"fsdp1": check_fsdp1, "impact": check_impact, "bf16": check_bf16}
    for name in args.only:
        print(f"[{name}] ...", flush=True)
        missing = missing_modules(name)
        try:
            if missing:
                raise ModuleNotFoundError(f"{name} needs {', '.join(missing)}, not installed here: "
                                          f"pip install {' '.join(missing.values())}")
            if name in ("step", "memory"):
                found = found or train_step(args, args.out, log)  # one pair of runs serves both checks
                results[name] = (check_step if name == "step" else check_memory)(found)
            else:
                results[name] = others[name](args, args.out, log)
        except Exception as exc:  # a check that errs is reported; the others still run
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}] {json.dumps(results[name], default=str)[:300]}", flush=True)
    text = report(results, args, time.time() - start)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + text + f"\nwritten to {args.out / 'gpu_check.md'}")
    # a dry run checks the steps (none may err), a real one the figures too
    ok = all("error" not in r for r in results.values()) if args.dry_run else all(r.get("passed") for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
