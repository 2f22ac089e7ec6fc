"""What computes a run besides its configuration: the libraries' versions, torch's CPU threads, the device
and its chip.

The last bits of training and generation follow them: a weight gradient sums the batch in chunks whose
number follows the thread count, a new torch or transformers release may reorder an operation, and a CPU's
instruction set picks its kernels. On the embedded world those bits move a run's TPA by whole points (the
same code and seed read 9.2 in one environment and 11.5 in a later one). So every run records them
(run.json's "environment"), and a model or evaluation kept on disk (M_old's stages, the before-evaluation)
is reused only under the same ones.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# the libraries whose arithmetic a trained model or an evaluation depends on
ARITHMETIC_LIBRARIES = ("torch", "transformers", "peft", "lightning")
# recorded beside them in run.json: what else a run reads, to say what it ran under
RECORDED_LIBRARIES = (*ARITHMETIC_LIBRARIES, "accelerate", "tokenizers", "datasets", "numpy", "hydra-core",
                      "omegaconf", "lm_eval", "openai", "trace-realign")


def versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Each installed distribution's version, None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_for(accelerator: str) -> torch.device:
    """The device a run computes on for trainer.accelerator (a GPU when it names or finds one)."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} but no GPU is visible here; "
                         "set trainer.accelerator=cpu")
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def processor(device: torch.device) -> str:
    """The chip that computes: the GPU's name, or the CPU's model (its kernels differ by instruction set)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    except OSError:
        pass
    # the instruction set torch dispatches its CPU kernels for (a virtual machine may name no model)
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def arithmetic(device: torch.device) -> dict[str, Any]:
    """What, beside the inputs, fixes a computation's bits: the key part of every cache of computed results."""
    return {"threads": torch.get_num_threads(), "device": device.type, "processor": processor(device),
            "libraries": versions(ARITHMETIC_LIBRARIES)}


def source_commit() -> str | None:
    """The git commit of this package's source ("-dirty" when it has uncommitted changes), None when it is
    not a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository's tree (a venv in a checkout)
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def describe(device: torch.device) -> dict[str, Any]:
    """A run's environment as run.json records it."""
    return {
        **arithmetic(device),
        "libraries": versions(RECORDED_LIBRARIES),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "source": source_commit(),
    }
