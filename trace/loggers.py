"""Experiment loggers built from config."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any


def wandb_credentials_present() -> bool:
    """True when wandb could log in without asking: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_logger(mode: str | None = None, **kwargs: Any):
    """Lightning's WandbLogger that never prompts: offline unless credentials are present.

    The key is read by wandb itself from the environment; it is never passed here, so it cannot reach
    the config, the logs or the run's files.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode is None:
        mode = "online" if wandb_credentials_present() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(kwargs.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
    return WandbLogger(mode=mode, anonymous="never", **kwargs)
