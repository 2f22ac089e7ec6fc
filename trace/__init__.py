"""trace-realign: re-align an aligned language model to a changed policy with TRACE."""

__version__ = "0.1.0"
