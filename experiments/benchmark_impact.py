"""Impact scores two ways: impact.method=loop (one backward pass per conflict sample) against
impact.method=batched (one backward pass per batch, through hooks on the layers), on the embedded benchmark.

    python experiments/benchmark_impact.py                                   # 1000 conflict pairs, tiny model
    python experiments/benchmark_impact.py --pairs 200 --out experiments/results
    python experiments/benchmark_impact.py --config 300m --device cuda --loop-pairs 100

Both run TraceModule.compute_impact, the code a training run uses, at theta_ref (the model built from
model.build with random weights and LoRA as model.lora: the timing and the exactness do not depend on the
weights having been aligned), each in a process of its own so that peak memory is its own. `--config`
swaps in a larger Llama built from a transformers LlamaConfig (presets below; any `model.build.*` also
goes after `--`). With `--loop-pairs N` the loop scores only the first N pairs and its time is extrapolated
per pair (gold gradient timed apart and counted once). Reports wall time, speed-up, the largest per-sample
relative error, the Spearman correlation of the scores, whether the clipped and normalised weights agree,
and peak memory (RSS; CUDA's max allocated on a GPU).

Which of the two is off when they differ: `--truth-pairs N` (default 200; 0 skips it) also scores the first
N pairs with the loop on the same module cast to float64 (the same weights, LoRA's included), and reports
each float32 method's largest per-sample relative error against it. A score that nearly cancels carries the
float32 rounding of its forward and backward passes, in the loop as much as in the batched method.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS: dict[str, list[str]] = {
    "tiny": [],
    # about 300M parameters (vocabulary of the embedded tokenizer, so nearly all are in the layers)
    "300m": ["model.build.hidden_size=1024", "model.build.intermediate_size=2816", "model.build.num_hidden_layers=24",
             "model.build.num_attention_heads=16", "model.build.num_key_value_heads=8",
             "model.build.max_position_embeddings=512"],
}


class ConflictView:
    """The datamodule with only its first n conflict samples (what compute_impact reads of it)."""

    def __init__(self, dm: Any, n: int):
        self.dm, self.num_conflicts = dm, min(n, dm.num_conflicts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dm, name)


def build(pairs: int, overrides: list[str], device: str) -> tuple[Any, Any, Any]:
    """The composed config, the triaged datamodule and the module on `device`, as a run builds them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from trace_realign.models.loading import load_tokenizer, resolve_model_path
    from trace_realign.steps import build_datamodule, build_judges, build_module, seed_everything

    per_axis = max(200, math.ceil(pairs * 0.7))  # two of four axes shift: about 1.5 conflicts per 4 pairs
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"dataset.pairs_per_axis={per_axis}", "logger=none", *overrides])
    seed_everything(cfg.seed)
    source = instantiate(cfg.dataset)
    oracle, _, _ = build_judges(cfg, source)
    work = Path(tempfile.mkdtemp(prefix="benchmark_impact."))
    objective, dm = build_datamodule(cfg, source, oracle, None, work)
    dm.prepare_data()
    path = resolve_model_path(cfg.model, source.corpus() if cfg.model.get("build") else None, cfg.paths.cache_dir)
    dm.tokenizer = load_tokenizer(path, cfg.model)
    dm.setup("fit")
    if dm.num_conflicts < pairs:
        raise SystemExit(f"the embedded data gave {dm.num_conflicts} conflict pairs, fewer than --pairs {pairs}")
    module = build_module(cfg, path, objective).to(device)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(), world_size=1, is_global_zero=True, global_rank=0)
    return cfg, dm, module


def peak_memory(device: str) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mib": rss}
    if device.startswith("cuda"):
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child(args: argparse.Namespace) -> None:
    """One method in this process: scores, weights, timings and peak memory to args.result. Method "truth"
    is the loop on the module cast to float64 after it was built, so its weights are the float32 runs'."""
    _, dm, module = build(args.pairs, args.overrides, args.device)
    if args.method == "batched":
        n = args.pairs
    elif args.method == "truth":
        n = min(args.truth_pairs, args.pairs)
        module.double()
    else:
        n = min(args.loop_pairs or args.pairs, args.pairs)
    module.impact_method = "loop" if args.method == "truth" else args.method
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    module.compute_impact(ConflictView(dm, 0))  # the gold gradient alone (no conflict sample to score)
    gold_seconds = time.perf_counter() - start
    start = time.perf_counter()
    w, _ = module.compute_impact(ConflictView(dm, n))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.save({"scores": module.impact_raw, "weights": w, "seconds": seconds, "gold_seconds": gold_seconds,
                "n": n, "parameters": sum(p.numel() for p in module.policy.parameters()),
                "trainable": sum(p.numel() for p in module.policy.parameters() if p.requires_grad),
                **peak_memory(args.device)}, args.result)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def max_rel_error(scores: torch.Tensor, reference: torch.Tensor) -> float:
    return float(((scores - reference).abs() / reference.abs().clamp(min=1e-300)).max())


def against_truth(truth: dict[str, Any], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each float32 run's largest per-sample relative error and Spearman against the float64 loop, on the
    pairs all of them scored."""
    n = min(truth["n"], *(r["n"] for r in runs.values()))
    t = truth["scores"][:n]
    scale = float(t.abs().max())
    out: dict[str, Any] = {"truth_pairs": n}
    for name, r in runs.items():
        s = r["scores"][:n]
        out[f"{name}_max_rel_error_vs_float64"] = max_rel_error(s, t)
        out[f"{name}_pairs_over_1e-4_vs_float64"] = int(((s - t).abs() > 1e-4 * t.abs()).sum())
        out[f"{name}_error_vs_largest_vs_float64"] = float((s - t).abs().max() / scale) if scale else 0.0
        out[f"{name}_spearman_vs_float64"] = spearman(s, t)
    return out


def compare(loop: dict[str, Any], batched: dict[str, Any], pairs: int, gamma: float = 1.0) -> dict[str, Any]:
    """Timing (the loop's extrapolated to every pair when it scored a subset) and agreement on the pairs
    both scored."""
    from trace_realign.method.impact import clip_and_normalise

    n = loop["n"]
    per_pair = (loop["seconds"] - loop["gold_seconds"]) / n
    loop_seconds = loop["gold_seconds"] + per_pair * pairs
    s_loop, s_batched = loop["scores"][:n], batched["scores"][:n]
    scale = float(s_loop.abs().max())
    w_loop, _ = clip_and_normalise(s_loop, gamma)
    w_batched, _ = clip_and_normalise(s_batched, gamma)
    return {
        "pairs": pairs, "loop_pairs": n, "loop_extrapolated": n < pairs,
        "parameters": batched["parameters"], "trainable": batched["trainable"],
        "loop_seconds": loop_seconds, "loop_seconds_per_pair": per_pair,
        "batched_seconds": batched["seconds"], "batched_seconds_per_pair": (batched["seconds"] - batched["gold_seconds"]) / pairs,
        "gold_seconds": batched["gold_seconds"],
        "speedup": loop_seconds / batched["seconds"],
        "max_rel_error": max_rel_error(s_batched, s_loop),
        # a score that nearly cancels carries the fp32 noise of both forwards: also measured against the largest
        "max_error_vs_largest_score": float((s_batched - s_loop).abs().max() / scale) if scale else 0.0,
        "spearman": spearman(s_loop, s_batched),
        "weights_allclose": bool(torch.allclose(w_batched, w_loop, rtol=1e-4, atol=1e-9)),
        "same_nonzero_weights": bool(torch.equal(w_batched > 0, w_loop > 0)),
        "loop_peak_rss_mib": loop["peak_rss_mib"], "batched_peak_rss_mib": batched["peak_rss_mib"],
        **({"loop_peak_cuda_mib": loop["peak_cuda_mib"], "batched_peak_cuda_mib": batched["peak_cuda_mib"]}
           if "peak_cuda_mib" in batched else {}),
    }


def markdown(r: dict[str, Any], command: str) -> str:
    loop_note = f" (extrapolated from {r['loop_pairs']} pairs)" if r["loop_extrapolated"] else ""
    rows = [("conflict pairs", r["pairs"]), ("batch size", r["batch_size"]), ("device", r.get("gpu", r["device"])),
            ("parameters / trainable", f"{r['parameters']:,} / {r['trainable']:,}"),
            ("gold gradient (s)", f"{r['gold_seconds']:.2f}"),
            ("loop (s)" + loop_note, f"{r['loop_seconds']:.2f}"), ("batched (s)", f"{r['batched_seconds']:.2f}"),
            ("speed-up", f"{r['speedup']:.1f}x"), ("max per-sample relative error", f"{r['max_rel_error']:.2e}"),
            ("max error / largest score", f"{r['max_error_vs_largest_score']:.2e}"),
            ("Spearman of scores", f"{r['spearman']:.6f}"), ("weights allclose", r["weights_allclose"]),
            ("peak RSS loop / batched (MiB)", f"{r['loop_peak_rss_mib']:.0f} / {r['batched_peak_rss_mib']:.0f}")]
    if "truth_pairs" in r:
        pair = lambda key, fmt: f"{format(r['loop_' + key], fmt)} / {format(r['batched_' + key], fmt)}"  # noqa: E731
        rows += [(f"vs float64 loop ({r['truth_pairs']} pairs): max rel. error loop / batched",
                  pair("max_rel_error_vs_float64", ".2e")),
                 ("vs float64 loop: pairs off by > 1e-4 relative, loop / batched", pair("pairs_over_1e-4_vs_float64", "d")),
                 ("vs float64 loop: max error / largest score, loop / batched", pair("error_vs_largest_vs_float64", ".2e")),
                 ("vs float64 loop: Spearman loop / batched", pair("spearman_vs_float64", ".6f"))]
    if "batched_peak_cuda_mib" in r:
        rows.append(("peak CUDA loop / batched (MiB)", f"{r['loop_peak_cuda_mib']:.0f} / {r['batched_peak_cuda_mib']:.0f}"))
    return f"`{command}`\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1000, help="conflict pairs to score")
    ap.add_argument("--loop-pairs", type=int, default=None, help="score only this many with the loop (extrapolated)")
    ap.add_argument("--config", default="tiny", help=f"model: one of {list(PRESETS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8],
                    help="impact.batch_size; several sizes are each compared with one loop run")
    ap.add_argument("--truth-pairs", type=int, default=200,
                    help="score this many pairs with the loop in float64 as the truth for both (0: skip)")
    ap.add_argument("--out", type=Path, default=None, help="folder for impact_<config>[_b<size>].json and .md")
    ap.add_argument("--method", choices=["loop", "batched", "truth"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides (after --), e.g. model.build.num_hidden_layers=8")
    args = ap.parse_args()
    if args.config not in PRESETS:
        raise SystemExit(f"--config {args.config!r}: expected one of {list(PRESETS)}")
    if min(args.batch_size) < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: every size must be >= 1")
    if args.truth_pairs < 0:
        raise SystemExit(f"--truth-pairs {args.truth_pairs}: expected >= 0")
    user = list(args.overrides)
    if args.method:
        args.overrides = [*PRESETS[args.config], f"impact.batch_size={args.batch_size[0]}", *user]
        child(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the loop does not batch: one run serves every batch size
        runs = [("loop", args.batch_size[0]), *(("batched", b) for b in args.batch_size)]
        if args.truth_pairs:
            runs.append(("truth", args.batch_size[0]))
        for method, size in runs:
            out = Path(tmp) / f"{method}_{size}.pt"
            cmd = [sys.executable, __file__, "--method", method, "--result", str(out), "--pairs", str(args.pairs),
                   "--device", args.device, "--batch-size", str(size), "--config", args.config]
            if args.loop_pairs:
                cmd += ["--loop-pairs", str(args.loop_pairs)]
            cmd += ["--truth-pairs", str(args.truth_pairs)]
            label = {"batched": f"batched (batch {size})", "truth": "loop in float64"}.get(method, method)
            print(f"{label}: scoring ...", flush=True)
            subprocess.run([*cmd, "--", *user], check=True)
            results[(method, size)] = torch.load(out)
    command = ("python experiments/benchmark_impact.py " + " ".join(sys.argv[1:])).strip()
    loop = results[("loop", args.batch_size[0])]
    for size in args.batch_size:
        batched = results[("batched", size)]
        report = {**compare(loop, batched, args.pairs), "config": args.config,
                  "device": args.device, "batch_size": size, "torch_threads": torch.get_num_threads()}
        if args.truth_pairs:
            report.update(against_truth(results[("truth", args.batch_size[0])], {"loop": loop, "batched": batched}))
        if args.device.startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name(0)
        text = markdown(report, command)
        print(text)
        if args.out:
            name = f"impact_{args.config}" + (f"_b{size}" if len(args.batch_size) > 1 else "")
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.json").write_text(json.dumps({**report, "command": command}, indent=2) + "\n")
            (args.out / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
