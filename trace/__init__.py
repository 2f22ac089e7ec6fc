"""trace-realign: re-align an aligned language model to a changed policy with TRACE."""

from omegaconf import OmegaConf

from trace_realign.core import moved

__version__ = "0.1.0"

moved.install()

# data.dpo_gold_punish (keep | drop | correction) as the DPO-Gold method's term for punished pairs.
_GOLD_PUNISH_TERMS = {"keep": "relational", "drop": None, "correction": "relational_correction"}


def _gold_punish_term(rule: str) -> str | None:
    if rule not in _GOLD_PUNISH_TERMS:
        raise ValueError(f"data.dpo_gold_punish: {rule!r}; expected one of {list(_GOLD_PUNISH_TERMS)}")
    return _GOLD_PUNISH_TERMS[rule]


def _tuned(key: str, default: object = "__required__", *, _root_: object) -> object:
    """recipe=tuned: `key` of the method's row in the model's table of tuned recipes (model.tuned.<method>)."""
    table = _root_.model.get("tuned") or {}  # type: ignore[attr-defined]
    # whose row: model.recipe.tuned_for's (the command line's choice), else the method's own, else the row its
    # table names as its recipe (method.tuned_as: an ablation runs at TRACE's, dpo and rdpo share DPO-Gold's)
    method = _root_.method  # type: ignore[attr-defined]
    name = _root_.model.recipe.get("tuned_for") or (  # type: ignore[attr-defined]
        method.name if method.name in table or not method.get("tuned_as") else method.tuned_as)
    if name not in table:
        raise ValueError(f"recipe=tuned: model {_root_.model.get('name_or_path')} has no tuned recipe for method={name} "  # type: ignore[attr-defined]
                         f"(model.tuned has {sorted(table) or 'none'}); tune it with "
                         f"`python experiments/tune.py --method {name}` and add its best.yaml to model.tuned.{name}")
    row = table[name]
    if key not in row:
        if default == "__required__":
            raise ValueError(f"recipe=tuned: model.tuned.{name} has no {key}")
        return default
    return row[key]


if not OmegaConf.has_resolver("tuned"):
    OmegaConf.register_new_resolver("tuned", _tuned)
if not OmegaConf.has_resolver("gold_punish_term"):
    OmegaConf.register_new_resolver("gold_punish_term", _gold_punish_term)
