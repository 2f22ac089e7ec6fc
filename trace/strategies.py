"""Distributed strategies whose arguments YAML cannot spell (classes named by dotted path)."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)


def _import(dotted: str) -> type | None:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        log.warning("fsdp: layer class %s not importable here; skipped", dotted)
        return None


def fsdp(layer_classes: Sequence[str], sharding_strategy: str = "FULL_SHARD", **kwargs: Any):
    """Lightning's FSDPStrategy wrapping each decoder layer; use_orig_params so LoRA's frozen and
    trainable parameters can share a flat parameter."""
    from lightning.pytorch.strategies import FSDPStrategy

    classes = {c for c in (_import(d) for d in layer_classes) if c is not None}
    if not classes:
        raise ValueError(f"trainer.strategy.layer_classes: none of {list(layer_classes)} could be imported")
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if kwargs.pop("activation_checkpointing", False) else None,
        sharding_strategy=sharding_strategy,
        use_orig_params=True,
        **kwargs,
    )
