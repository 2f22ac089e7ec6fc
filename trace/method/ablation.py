"""The ablation group (conf/ablation/): a method with one component of its term table changed, as the
paper's Table 4 removes them from TRACE.

An ablation says what it needs of the method's table (`requires`: dotted key -> value) and what it changes
(`set`). A method whose table lacks the component is refused, naming both: `method=u2a ablation=no_kl` has no
KL anchor to remove. The ablated method is named for the ablation (TRACE's: `no_kl`; another method's:
`trace_nll_no_kl`), so tables and run folders tell it apart, and `recipe=tuned` runs it at its method's row.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

NONE = "none"


def ablated_name(method: str, ablation: str) -> str:
    """The ablated method's name: TRACE's ablations keep the paper's names (no_kl), others prefix theirs."""
    return ablation if method == "trace" else f"{method}_{ablation}"


def is_ablated(method: str, ablation: str) -> bool:
    """Whether `method` is already a name ablated_name gives for `ablation` (the table already changed)."""
    return method == ablation or method.endswith(f"_{ablation}")


def ablate(cfg: DictConfig) -> DictConfig:
    """Apply cfg.ablation to cfg.method in place (once: a config already ablated is returned as it is)."""
    ablation = cfg.get("ablation")
    if ablation is None or ablation.name == NONE:
        return cfg
    method = cfg.method
    base = str(method.name)
    if is_ablated(base, str(ablation.name)):  # already applied (a stage or a re-entered run)
        return cfg
    for key, wanted in (ablation.get("requires") or {}).items():
        found = OmegaConf.select(method, key)
        if found != wanted:
            raise ValueError(
                f"ablation={ablation.name} ({ablation.what}) needs method.{key}={wanted!r}, and method={base} has "
                f"{found!r}: it has no such component to change. Table 4's ablations are of TRACE (method=trace); "
                f"to change {base} otherwise, override its table: method.{key}=...")
    with open_dict(method):
        for key, value in (ablation.get("set") or {}).items():
            OmegaConf.update(method, key, value, merge=False)
        method.name = ablated_name(base, str(ablation.name))
        if not method.get("tuned_as"):
            method.tuned_as = base  # recipe=tuned: the method's row (an ablation keeps its method's recipe)
    return cfg
