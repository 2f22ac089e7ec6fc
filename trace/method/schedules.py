"""Learning-rate schedules that a config names with `_partial_: true` (the module passes the optimizer)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_with_warmup(optimizer: Optimizer, max_steps: int, warmup_ratio: float = 0.1,
                       warmup_steps: int | None = None) -> LambdaLR:
    """Linear warmup over `warmup_ratio` of `max_steps`, then a cosine decay to 0 at `max_steps`.

    The warmup is a ratio, so one recipe fits any trainer.max_steps; `warmup_steps` gives it in steps
    instead (the reference's 100, as transformers' Trainer counts them: with fewer steps in all, the rate
    never reaches its peak).
    """
    from transformers import get_cosine_schedule_with_warmup

    if int(max_steps) < 1:
        raise ValueError(f"scheduler: a cosine schedule needs trainer.max_steps >= 1 to know where it ends, "
                         f"got {max_steps}; set trainer.max_steps or scheduler=null")
    if not 0.0 <= float(warmup_ratio) < 1.0:
        raise ValueError(f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if warmup_steps is not None and int(warmup_steps) < 0:
        raise ValueError(f"scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    warmup = int(warmup_steps) if warmup_steps is not None else round(float(warmup_ratio) * int(max_steps))
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=int(max_steps))
