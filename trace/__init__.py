"""trace-realign: re-align an aligned language model to a changed policy with TRACE."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# data.dpo_gold_punish (keep | drop | correction) as the DPO-Gold method's term for punished pairs.
_GOLD_PUNISH_TERMS = {"keep": "relational", "drop": None, "correction": "relational_correction"}


def _gold_punish_term(rule: str) -> str | None:
    if rule not in _GOLD_PUNISH_TERMS:
        raise ValueError(f"data.dpo_gold_punish: {rule!r}; expected one of {list(_GOLD_PUNISH_TERMS)}")
    return _GOLD_PUNISH_TERMS[rule]


if not OmegaConf.has_resolver("gold_punish_term"):
    OmegaConf.register_new_resolver("gold_punish_term", _gold_punish_term)
