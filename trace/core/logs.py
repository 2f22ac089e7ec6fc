"""Keeping the console about the run: the project's own lines on it, every library's in the run's log file.

The apps' logging (conf/hydra/default.yaml, hydra.job_logging) sends every record to the run's log file and
only the project's own (loggers under trace_realign) and any library's errors to the console (ConsoleFilter).
Python warnings are logged (py.warnings), so they go to the file too. What libraries print themselves
(lm-eval's progress bars, a subprocess's complaint) is sent to a file of the run's with `stderr_to`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

from lightning.pytorch.callbacks import RichProgressBar

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


class ConsoleFilter(logging.Filter):
    """The console's share of the records: the project's own, and any library's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("trace_realign") or record.levelno >= logging.ERROR


logging.captureWarnings(True)  # warnings.warn -> the `py.warnings` logger -> the run's log file
# Lightning gives its loggers a console handler of their own and stops them propagating when it is imported
# before logging is configured: hand its records to the apps' handlers like every other library's.
for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    _logger = logging.getLogger(_name)
    for _handler in list(_logger.handlers):
        if type(_handler) is logging.StreamHandler:
            _logger.removeHandler(_handler)
    _logger.propagate = True


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Everything written to standard error meanwhile, by Python or by a subprocess (a library's progress
    bars, git's "not a git repository"), appended to `path` instead of the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with path.open("a", encoding="utf-8") as fh:
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class StepProgressBar(RichProgressBar):
    """Lightning's bar, named for what it counts: a run is steps (trainer.max_steps), not epochs, and
    Lightning's own label reads "Epoch 0/-2" when epochs are unbounded."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"
