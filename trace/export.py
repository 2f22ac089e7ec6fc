"""`trace-export`: a run's realigned model as an ordinary transformers model folder.

    trace-export outputs/trace/<time>                       # writes outputs/trace/<time>/merged/
    trace-export RUN --out realigned/ --push-to-hub org/realigned-model   # needs HF_TOKEN

A LoRA run's adapter is merged into the base it sits on (the model the run started from); a run that
trained or re-trained the whole model is saved as it is. The folder holds the weights, the config and the
tokenizer with its chat template, so `AutoModelForCausalLM.from_pretrained(folder)` loads it with no
reference to this package, its cache or the base model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from trace_realign.core.rundir import model_folder
from trace_realign.models.loading import load_for_eval, load_tokenizer


class ExportError(ValueError):
    """A run folder that holds no model to export, or a push without credentials."""


def run_model(run: Path) -> tuple[Path, dict[str, Any]]:
    """(the run's adapter/ or model/ folder, the run's model settings)."""
    try:
        folder = model_folder(run)
    except ValueError as exc:
        raise ExportError(str(exc)) from exc
    config = run / "config.yaml"
    model_cfg = OmegaConf.to_container(OmegaConf.load(config).model, resolve=True) if config.is_file() else {}
    return folder, model_cfg


def hub_token() -> str | None:
    """The hub token the upload would use: HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), else the one `hf auth login`
    stored."""
    from huggingface_hub import get_token

    return get_token()


def export(run: str | Path, out: str | Path | None = None, push_to_hub: str | None = None,
           private: bool = True) -> Path:
    """Merge and save the run's model to `out` (default <run>/merged); optionally push it to the hub."""
    run = Path(run)
    if push_to_hub and not hub_token():
        raise ExportError("--push-to-hub needs credentials: set HF_TOKEN (or log in with `hf auth login`)")
    folder, model_cfg = run_model(run)
    model = load_for_eval(str(folder), model_cfg)
    if hasattr(model, "merge_and_unload"):  # a PeftModel: fold the adapter into the base's weights
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(str(folder), model_cfg)
    target = Path(out) if out is not None else run / "merged"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    if push_to_hub:
        model.push_to_hub(push_to_hub, private=private)
        tokenizer.push_to_hub(push_to_hub, private=private)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trace-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a trace-realign run folder")
    parser.add_argument("--out", type=Path, help="the model folder to write (default: RUN/merged)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload it to this hub repository")
    parser.add_argument("--public", action="store_true", help="make the hub repository public (default private)")
    args = parser.parse_args(argv)
    try:
        target = export(args.run, args.out, args.push_to_hub, private=not args.public)
    except ExportError as exc:
        print(f"trace-export: {exc}", file=sys.stderr)
        return 2
    print(f"trace-export: wrote {target}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
