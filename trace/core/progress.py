"""Progress bars: drawn on a terminal, never into a log."""

from __future__ import annotations

import sys


def bar_off(progress: bool) -> bool | None:
    """tqdm's `disable` for a bar the caller wants (`progress`): None lets tqdm switch the bar off itself
    when stderr is not a terminal, so logs and captured output get no half-drawn bars."""
    return None if progress else True


def on_terminal() -> bool:
    """Whether the console is a terminal (stdout, where Lightning's bar draws): a bar is drawn only there."""
    return sys.stdout.isatty()
