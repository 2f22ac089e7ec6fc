"""Training cost of TRACE: peak memory with the LoRA reference, and step time against DPO.

    python experiments/benchmark_train.py                                  # tiny M_old, CPU
    python experiments/benchmark_train.py --device cuda --hidden-size 1024 --layers 8 --batch-size 8
    python experiments/benchmark_train.py --steps 5 --warmup 1 -- model.lora.r=8   # Hydra overrides after --
    python experiments/benchmark_train.py -- threads=1     # a busy CPU: one thread times far more steadily
    python experiments/benchmark_train.py --device cuda --trainer fsdp1 --only trace_lora dpo_lora -- trainer.devices=1

Every configuration is the real training path: the configs composed with compose() as `trace-realign`
composes them, the embedded benchmark's DataModule (triage, its StepStream) and TraceModule.training_step
driven by a Lightning Trainer (optimizer, gradient clipping and logging included). A timing callback measures
on_train_batch_start -> on_train_batch_end (forward, backward and optimizer step; the data loader's batch
comes before); --warmup steps are excluded and the median and IQR of --steps steps are reported. Each
configuration runs in a fresh process, so its memory figures are its own.

The configurations (B = --batch-size):

    trace_lora    TRACE, LoRA, B pairs each of invert / punish / retain; the reference is the policy with
                  its adapters disabled (load_policy returns no reference under LoRA)       time, memory (a)
    dpo_lora      DPO on the same data, LoRA, 3B pairs per step (--dpo-match pairs: the same pairs per step
                  as TRACE; --dpo-match rows: round(5B/2) pairs, the same policy rows as TRACE)   time
    policy_lora   the policy alone: the TRACE step with no reference forward in the window. The invert and
                  punish terms read log pi_ref from the ReferenceCache, filled before the first step; the
                  retain term, whose KL reads the reference's logits (which the code cannot cache), is the
                  policy's NLL on the same retained rows (method.terms.retain=nll): the same policy
                  forward and backward, without the reference forward and its logits           memory (b)
    trace_full    TRACE, full fine-tuning against a frozen copy (model.lora.enabled=false)    memory (c)
    policy_full   policy_lora's step with full fine-tuning, the frozen copy deleted after the cache is
                  filled: what the copy costs is trace_full against this                       memory (d)

The reference cache: both timed methods cache log pi_ref per row after its first use. --reference-cache
cold (the default) empties the cache before every step, so every step of both methods runs the reference
forward (a first epoch); warm fills it before the first step, so neither does (later epochs; TRACE's KL
term always runs the reference on the retained rows). Impact weights (stage 2, once before the first step)
are not a step: every configuration uses uniform weights (method.weights=uniform) unless --impact.

Memory: on CUDA, torch.cuda.max_memory_allocated over the measured steps (the peak reset after warm-up);
on a CPU, the process's peak RSS over the measured steps (VmHWM, reset through /proc/self/clear_refs after
warm-up) and over its whole life (VmHWM and ru_maxrss read before that reset, and the window's), both
absolute: on a CPU they include the interpreter and
libraries, which the tiny model does not outweigh (the step's own share is shown as peak minus the RSS at
the first measured step, for information). Acceptance, reported and never asserted:

    (1) peak memory of trace_lora <= 1.1 x policy_lora
    (2) median step time of trace_lora <= 1.3 x dpo_lora

Writes <out>.json and <out>.md (default experiments/results/benchmark_train).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

MEMORY_LIMIT = 1.1  # acceptance (1): trace_lora / policy_lora peak memory
TIME_LIMIT = 1.3  # acceptance (2): trace_lora / dpo_lora median step time
CONF = Path(__file__).resolve().parents[1] / "conf"
# The run settings every configuration shares: no evaluation, no selection, no logger, uniform weights.
COMMON = ["logger=none", "select.enabled=false", "eval.enabled=false", "eval.before=false",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
NO_REFERENCE_RETAIN = "method.terms.retain=nll"  # the policy alone: NLL on the retained rows in place of KL


@dataclass
class Config:
    """One measured configuration: its Hydra overrides and how the harness treats the reference."""

    name: str
    overrides: list[str]
    cache: str  # cold | warm (see the module docstring)
    drop_reference: bool = False  # delete the frozen copy once the cache is filled (policy_full)
    measures: str = ""


@dataclass
class Result:
    name: str
    device: str
    times_s: list[float] = field(default_factory=list)
    rows_per_step: list[int] = field(default_factory=list)
    reference_forwards: int = 0  # ReferenceCache misses in the window (category batches whose log pi_ref was computed)
    cache_hits: int = 0
    peak_bytes: int = 0  # the measured window's peak (CUDA allocated or CPU RSS)
    start_bytes: int = 0  # allocated / RSS at the first measured step
    lifetime_peak_bytes: int = 0  # the whole process's peak (CUDA allocated or CPU RSS), window included
    trainable_params: int = 0
    total_params: int = 0
    batch_sizes: dict[str, int] = field(default_factory=dict)
    terms: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.times_s) < 2:
            return self.times_s[0], self.times_s[0]
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q[0], q[2]


# -- the configurations --

def configurations(args: argparse.Namespace) -> list[Config]:
    b = args.batch_size
    sizes = lambda i, p, r: [f"data.batch_size.invert={i}", f"data.batch_size.punish={p}", f"data.batch_size.retain={r}"]  # noqa: E731
    dpo_pairs = 3 * b if args.dpo_match == "pairs" else max(1, round(5 * b / 2))
    trace = ["method=trace", *sizes(b, b, b)]
    full = "model.lora.enabled=false"
    configs = [
        Config("trace_lora", trace, args.reference_cache, measures="time, memory (a)"),
        Config("dpo_lora", ["method=dpo_old_labels", *sizes(b, b, dpo_pairs)], args.reference_cache, measures="time"),
        Config("policy_lora", [*trace, NO_REFERENCE_RETAIN], "warm", measures="memory (b)"),
        Config("trace_full", [*trace, full], args.reference_cache, measures="memory (c)"),
        Config("policy_full", [*trace, NO_REFERENCE_RETAIN, full], "warm", drop_reference=True, measures="memory (d)"),
    ]
    return [c for c in configs if not args.only or c.name in args.only]


def run_overrides(args: argparse.Namespace, model_path: str) -> list[str]:
    """What every configuration's run shares: the model folder, device, sizes, the window's length."""
    trainer = trainer_override(args)
    weights = [] if args.impact else ["method.weights=uniform"]
    # the user's overrides first: the model is then the folder built above (its build and prealign settings,
    # which the user's may name, are dropped after them)
    return [*args.overrides, *COMMON, trainer, *weights, f"model.name_or_path={model_path}", "model.build=null",
            "model.prealign=null", f"data.max_length={args.max_length}",
            f"data.max_prompt_length={min(args.max_length // 2, 64)}", f"trainer.max_steps={args.warmup + args.steps}",
            f"paths.cache_dir={cache_dir()}"]


def trainer_name(args: argparse.Namespace) -> str:
    """--trainer, else the device's own trainer config."""
    return args.trainer or ("gpu" if args.device == "cuda" else "cpu")


def trainer_override(args: argparse.Namespace) -> str:
    return f"trainer={trainer_name(args)}"


def cache_dir() -> str:
    return os.environ.get("TRACE_CACHE_DIR") or str(Path(os.environ.get("HOME", ".")) / ".cache" / "trace-realign")


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


# -- the model: M_old of the embedded default, optionally a larger Llama with its tokenizer --

def build_m_old(overrides: list[str]) -> str:
    """M_old's folder for the embedded default: built by the stages that `trace-realign` runs, or cached."""
    from hydra.utils import instantiate

    from trace_realign.models.loading import resolve_model_path
    from trace_realign.models.prealign import prealigned_model
    from trace_realign.train import run

    cfg = compose_cfg([f"paths.output_dir={tempfile.mkdtemp(prefix='bench-m-old-')}",
                       f"paths.cache_dir={cache_dir()}", *overrides])
    source = instantiate(cfg.dataset)
    base = resolve_model_path(cfg.model, source.corpus(), cfg.paths.cache_dir)
    if not cfg.model.get("prealign"):
        return base
    path, _ = prealigned_model(cfg, base, run, source)
    return path


def build_larger_llama(tokenizer_dir: str, hidden: int, layers: int, heads: int | None, intermediate: int | None) -> str:
    """A Llama of the given size with random weights (enough for time and memory) and the embedded default's
    tokenizer, saved once under the cache so every configuration loads it by the same from_pretrained path."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    heads = heads or max(1, hidden // 64)
    intermediate = intermediate or 4 * hidden
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate, "tokenizer": tokenizer_dir}
    target = Path(cache_dir()) / f"bench-llama-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return str(target)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    LlamaForCausalLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return str(target)


# -- one configuration, in its own process --

class StepClock(L.Callback):
    """A Lightning callback timing on_train_batch_start -> on_train_batch_end after `warmup` steps, with the
    window's peak memory; it also fills or empties the reference cache as the configuration asks."""

    def __init__(self, config: Config, warmup: int, steps: int, result: Result):
        super().__init__()
        self.config, self.warmup, self.steps, self.result = config, warmup, steps, result
        self.cuda = result.device == "cuda"
        self.t0 = 0.0
        self.bar = None

    def on_fit_start(self, trainer, module) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.warmup + self.steps, desc=self.config.name, unit="step", file=sys.stderr, leave=False)

    def before_first_step(self, trainer, module) -> None:
        """After every on_fit_start (impact weights, with --impact, read the reference), before any step."""
        if self.config.cache == "warm":
            fill_reference_cache(module, trainer.datamodule)
        if self.config.drop_reference:
            module.reference = None  # nothing reads it now: the cache holds every log pi_ref the steps need
            free_memory(self.cuda)

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            self.before_first_step(trainer, module)
        if self.config.cache == "cold":
            module.reference_cache.rows.clear()  # every step pays the reference forward, as in a first epoch
        if batch_idx == self.warmup:
            free_memory(self.cuda)
            # the peak so far, before the reset forgets it (it also resets what ru_maxrss reads on Linux)
            self.result.lifetime_peak_bytes = max(peak_memory(self.cuda), 0 if self.cuda else lifetime_peak_rss())
            self.result.start_bytes = reset_peak_memory(self.cuda)
            module.reference_cache.hits = module.reference_cache.misses = 0
        if batch_idx >= self.warmup:
            self.result.rows_per_step.append(sum(len(part["labels"]) for part in batch.values()))
        synchronize(self.cuda)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        synchronize(self.cuda)
        elapsed = time.perf_counter() - self.t0
        self.bar.update(1)
        if batch_idx < self.warmup:
            return
        self.result.times_s.append(elapsed)
        if batch_idx == self.warmup + self.steps - 1:
            self.result.peak_bytes = peak_memory(self.cuda)
            self.result.reference_forwards = module.reference_cache.misses
            self.result.cache_hits = module.reference_cache.hits

    def on_fit_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()


def fill_reference_cache(module, dm) -> None:
    """log pi_ref of every row a sequence term serves, through the module's own ReferenceCache."""
    import torch

    from trace_realign.method.datamodule import collate
    from trace_realign.method.objective import SEQUENCE_TERMS

    for category, term in module.objective.terms.items():
        if term not in SEQUENCE_TERMS:
            continue
        rows, size = dm.rows.get(category) or [], dm.batch_size[category]
        for i in range(0, len(rows), size):
            with torch.no_grad():
                batch = module._to_device(collate(rows[i : i + size], dm.tokenizer.pad_token_id))
                module.reference_cache(module.policy, module.reference, category, batch)


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def free_memory(cuda: bool) -> None:
    import gc

    gc.collect()
    if cuda:
        import torch

        torch.cuda.empty_cache()


def reset_peak_memory(cuda: bool) -> int:
    """Start a new peak; returns the memory in use now (CUDA allocated, or RSS)."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass  # no reset: the window's peak is then the process's peak so far (stated in the report)
    return proc_status_bytes("VmRSS")


def peak_memory(cuda: bool) -> int:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    return proc_status_bytes("VmHWM") or lifetime_peak_rss()


def proc_status_bytes(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def lifetime_peak_rss() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024  # bytes on macOS, KiB on Linux


def measure(config: Config, common: list[str], warmup: int, steps: int, device: str, out_dir: Path) -> Result:
    """One configuration's run: the DataModule, tokenizer and module as `trace-realign` builds them, fitted
    for warmup + steps steps under the StepClock."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from trace_realign.core.logs import framework_quiet
    from trace_realign.models.loading import load_tokenizer
    from trace_realign.steps import build_datamodule, build_judges, build_module, pin_threads, seed_everything

    cfg = compose_cfg([*common, *config.overrides, f"paths.output_dir={out_dir}"])
    out = Path(cfg.paths.output_dir)
    pin_threads(cfg.get("threads"))
    seed_everything(cfg.seed)
    source = instantiate(cfg.dataset)
    oracle, _, _ = build_judges(cfg, source)
    objective, dm = build_datamodule(cfg, source, oracle, None, out)
    dm.prepare_data()
    model_path = str(cfg.model.name_or_path)
    dm.tokenizer = load_tokenizer(model_path, cfg.model)
    dm.setup("fit")
    seed_everything(cfg.seed)
    module = build_module(cfg, model_path, objective)
    result = Result(config.name, device, batch_sizes=dict(dm.batch_size),
                    terms={k: v for k, v in objective.terms.items()})
    result.trainable_params = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    result.total_params = sum(p.numel() for p in module.policy.parameters())
    clock = StepClock(config, warmup, steps, result)
    with framework_quiet(True):
        trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[clock])
        trainer.fit(module, datamodule=dm)
    if len(result.times_s) != steps:
        raise RuntimeError(f"{config.name}: measured {len(result.times_s)} steps of {steps} "
                           f"(stopped early: {module.stop_reason}); config {OmegaConf.to_yaml(cfg.trainer)}")
    # the whole process's peak: the larger of the peak before the window's reset and the window's own
    result.lifetime_peak_bytes = max(result.lifetime_peak_bytes, result.peak_bytes)
    return result


def worker(spec_path: Path, result_path: Path) -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's, on every step's batch
    spec = json.loads(spec_path.read_text())
    result = measure(Config(**spec["config"]), spec["common"], spec["warmup"], spec["steps"], spec["device"],
                     Path(spec["out_dir"]))
    result_path.write_text(json.dumps(asdict(result), indent=2))


def run_in_process(config: Config, common: list[str], args: argparse.Namespace, work: Path) -> Result:
    """One configuration in a fresh interpreter, so no other configuration's memory counts against it."""
    spec, result = work / f"{config.name}.spec.json", work / f"{config.name}.result.json"
    spec.write_text(json.dumps({"config": asdict(config), "common": common, "warmup": args.warmup,
                                "steps": args.steps, "device": args.device,
                                "out_dir": str(work / config.name)}))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec), str(result)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (its progress bar) passes through
    if proc.returncode != 0:
        sys.exit(f"{config.name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}")
    data = json.loads(result.read_text())
    return Result(**data)


# -- the report --

def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdicts(results: dict[str, Result]) -> list[dict[str, Any]]:
    """The two acceptance checks, each with its numbers and whether it passes (never asserted)."""
    out = []
    if "trace_lora" in results and "policy_lora" in results:
        a, b = results["trace_lora"], results["policy_lora"]
        r = ratio(a.peak_bytes, b.peak_bytes)
        out.append({"check": "(1) peak memory, LoRA TRACE with its reference / the policy alone", "ratio": r,
                    "limit": MEMORY_LIMIT, "pass": r <= MEMORY_LIMIT,
                    "numbers": f"{mib(a.peak_bytes)} / {mib(b.peak_bytes)} MiB"})
    if "trace_lora" in results and "dpo_lora" in results:
        a, b = results["trace_lora"], results["dpo_lora"]
        r = ratio(a.median, b.median)
        out.append({"check": "(2) median step time, TRACE / DPO", "ratio": r, "limit": TIME_LIMIT,
                    "pass": r <= TIME_LIMIT, "numbers": f"{a.median * 1e3:.1f} / {b.median * 1e3:.1f} ms"})
    return out


def report(results: dict[str, Result], configs: list[Config], args: argparse.Namespace, model: dict[str, Any]) -> str:
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name(0)
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS"
    lines = [f"Training step benchmark on {device}, trainer={trainer_name(args)} ({model['description']}; {args.warmup} warm-up + {args.steps} "
             f"measured steps; reference cache {args.reference_cache}; max_length {args.max_length}; "
             f"B = {args.batch_size}, DPO matched by {args.dpo_match})", "",
             f"| config | measures | policy rows/step | ref. batches | step ms median [IQR] | {memory} window MiB "
             f"| at window start MiB | window - start MiB | lifetime peak MiB | trainable / total params |",
             "|" + "---|" * 10]
    for c in configs:
        r = results[c.name]
        lo, hi = r.iqr
        rows = statistics.median(r.rows_per_step)
        lines.append(f"| {c.name} | {c.measures} | {rows:g} | {r.reference_forwards} | {r.median * 1e3:.1f} "
                     f"[{lo * 1e3:.1f}, {hi * 1e3:.1f}] | {mib(r.peak_bytes)} | {mib(r.start_bytes)} | "
                     f"{mib(r.peak_bytes - r.start_bytes)} | {mib(r.lifetime_peak_bytes)} | "
                     f"{r.trainable_params:,} / {r.total_params:,} |")
    lines += ["", "| check | ratio | limit | result | numbers |", "|---|---|---|---|---|"]
    for v in verdicts(results):
        lines.append(f"| {v['check']} | {v['ratio']:.3f} | {v['limit']} | {'PASS' if v['pass'] else 'FAIL'} | {v['numbers']} |")
    lines += ["", *contrasts(results)]
    lines += ["", "policy rows/step: rows of the step's batches (a pair is two rows); ref. batches: category batches "
              "of the sequence terms whose log pi_ref was computed over the measured steps (with fused forwards a step "
              "computes all of them, and the KL term's rows, which are never cached, in one reference forward). "
              "Memory is absolute; 'window - start' is for information only."]
    if args.overrides:
        lines.append(f"Overrides: {' '.join(args.overrides)}")
    return "\n".join(lines)


def contrasts(results: dict[str, Result]) -> list[str]:
    """What a second copy costs, and the step-only memory ratio, for information."""
    out = []
    if "trace_full" in results and "policy_full" in results:
        a, b = results["trace_full"], results["policy_full"]
        out.append(f"Full fine-tuning with its frozen copy / without: {ratio(a.peak_bytes, b.peak_bytes):.3f} "
                   f"({mib(a.peak_bytes)} / {mib(b.peak_bytes)} MiB)")
    if "trace_full" in results and "trace_lora" in results:
        a, b = results["trace_full"], results["trace_lora"]
        out.append(f"Full fine-tuning with its copy / LoRA with adapters disabled: {ratio(a.peak_bytes, b.peak_bytes):.3f}")
    if "trace_lora" in results and "policy_lora" in results:
        a, b = results["trace_lora"], results["policy_lora"]
        out.append("LoRA step memory above the window's start, with reference / alone: "
                   f"{ratio(a.peak_bytes - a.start_bytes, b.peak_bytes - b.start_bytes):.3f}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--trainer", choices=sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")),
                        help="the trainer config (default: gpu on cuda, cpu on cpu); e.g. fsdp or fsdp1 with "
                             "-- trainer.devices=1 to time one sharded GPU")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before the measured ones")
    parser.add_argument("--batch-size", type=int, default=8, help="B: TRACE's pairs per category per step")
    parser.add_argument("--max-length", type=int, default=128, help="data.max_length (tokens per row)")
    parser.add_argument("--dpo-match", choices=["pairs", "rows"], default="pairs",
                        help="DPO's batch: the same pairs per step as TRACE (3B) or the same policy rows (5B/2 pairs)")
    parser.add_argument("--reference-cache", choices=["cold", "warm"], default="cold",
                        help="cold: every step runs the reference (first epoch); warm: cached before the first step")
    parser.add_argument("--impact", action="store_true", help="keep TRACE's impact weights (scored once before step 1)")
    parser.add_argument("--hidden-size", type=int, help="time a Llama of this width (random weights) instead of M_old")
    parser.add_argument("--layers", type=int, default=4, help="its number of layers (with --hidden-size)")
    parser.add_argument("--heads", type=int, help="its attention heads (default hidden/64)")
    parser.add_argument("--intermediate-size", type=int, help="its MLP width (default 4 x hidden)")
    parser.add_argument("--only", nargs="+", choices=["trace_lora", "dpo_lora", "policy_lora", "trace_full", "policy_full"])
    parser.add_argument("--smoke", action="store_true", help="2 measured steps, 1 warm-up, B=2, max_length 64")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/benchmark_train"),
                        help="writes <out>.json and <out>.md")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every configuration (after --)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.max_length = 2, 1, 2, 64
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    return args


def write_report(results: dict[str, Result], configs: list[Config], args: argparse.Namespace,
                 model: dict[str, Any]) -> str:
    """<out>.md and <out>.json for the configurations measured so far; returns the markdown."""
    text = report(results, configs, args, model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
               "model": model, "configs": [asdict(c) for c in configs],
               "results": {k: {**asdict(r), "median_s": r.median, "iqr_s": r.iqr} for k, r in results.items()},
               "checks": verdicts(results)}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    if args.hidden_size:
        # random weights need only the embedded default's tokenizer: its base model, not M_old's stages
        print("the embedded default's base model, for its tokenizer (built once, then cached) ...", flush=True)
        path = build_m_old([*args.overrides, trainer_override(args), "model.prealign=null"])
    else:
        print("M_old of the embedded default (built once, then cached) ...", flush=True)
        path = build_m_old([*args.overrides, trainer_override(args)])  # built where the runs train (its cache key)
    model = {"path": path, "description": f"M_old of the embedded default ({path})"}
    if args.hidden_size:
        path = build_larger_llama(path, args.hidden_size, args.layers, args.heads, args.intermediate_size)
        model = {"path": path, "description": f"Llama hidden {args.hidden_size} x {args.layers} layers, random weights, "
                                              "the embedded default's tokenizer"}
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    common = run_overrides(args, path)
    configs = configurations(args)
    results: dict[str, Result] = {}
    for i, config in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {config.name} ({config.measures}) ...", flush=True)
        results[config.name] = run_in_process(config, common, args, work)
        # written after every configuration: a run stopped part-way keeps the ones it finished
        text = write_report(results, [c for c in configs if c.name in results], args, model)
    print("\n" + text)
    print(f"\nwritten to {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
