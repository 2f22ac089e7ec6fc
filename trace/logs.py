"""Keeping the console about the run: framework chatter filtered, inner runs silent."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

# Lightning's rank-zero messages (accelerator lines, advertising tips) go through this logger.
LIGHTNING = logging.getLogger("lightning.pytorch.utilities.rank_zero")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


LIGHTNING.addFilter(_NoTips())
for name in ("httpx", "httpx2", "httpcore", "openai"):  # one INFO line per HTTP request otherwise
    logging.getLogger(name).setLevel(logging.WARNING)
# A deprecation inside peft's own calls, repeated on every model load; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
# The frozen reference of full fine-tuning is a submodule kept in eval mode on purpose.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def quiet_transformers() -> None:
    """No per-load progress bars ("Loading weights", "Writing model shards") from transformers."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


quiet_transformers()


@contextlib.contextmanager
def framework_quiet(quiet: bool = True) -> Iterator[None]:
    """Silence Lightning's INFO lines (e.g. inside the stages that build M_old, which repeat them)."""
    if not quiet:
        yield
        return
    level = LIGHTNING.level
    LIGHTNING.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LIGHTNING.setLevel(level)
