"""Successive policy shifts: realign again and again (pi_0 -> pi_1 -> pi_2 ...), each shift an ordinary run.

`shifts.policies` lists the policies in turn after the dataset's policy_old (pi_0). Shift k is a run of the
same configuration in <output_dir>/shift<k>, with
  - its policies: pi_{k-1} -> pi_k (dataset.policy_old / policy_new);
  - its data: D as the organisation holds it once its model follows pi_{k-1}, triaged against pi_k like
    any data. The embedded world re-annotates the pairs first annotated under pi_0 (dataset.policy_base)
    under pi_{k-1} by its ground truth, with corrections. Any other dataset (a hub model's chain, with an
    LLM oracle) has no ground truth: shift k reads shift k-1's data/relabelled.jsonl, every pair as that
    shift's oracle relabelled it (inverted pairs swapped, punished ones with the oracle's correction as
    winner where it wrote one), in the splits it was in (data.splits=given), and evaluates on the same
    held-out prompts;
  - its starting model: M_old for the first shift, the previous shift's realigned model after that
    (model.from_run), so what each method did carries into the next shift.
Every shift evaluates agreement with every policy of the chain (eval.policies: pi_0, pi_1, ...), so what a
later shift undoes of an earlier one shows. The runs' own caches are keyed by their data and policies, so no
shift reads another's state. The chain's metrics.json holds each shift's metrics under shift<k>/.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from trace_realign.data.pipeline import GIVEN_SPLITS, RELABELLED_FILE

log = logging.getLogger(__name__)

SHIFT_DIR = "shift{k}"


def chain_policies(cfg: DictConfig) -> list[str]:
    """pi_0 then each policy of shifts.policies, as names or files; empty when no chain is asked."""
    policies = [str(p) for p in ((cfg.get("shifts") or {}).get("policies") or [])]
    if policies:
        check_chain(cfg)  # a dataset without policy_old is named, not a KeyError
    return [str(cfg.dataset.policy_old)] + policies if policies else []


def policy_label(policy: str) -> str:
    """The label a policy's agreement is reported under (agree_<label>): its name, or its file's stem."""
    return re.sub(r"\W", "_", Path(policy).stem)


def holds_ground_truth(cfg: DictConfig) -> bool:
    """Whether the dataset re-annotates D under any policy itself (the embedded world), or a later shift
    reads what the shift before relabelled."""
    return "policy_base" in cfg.dataset


def check_chain(cfg: DictConfig) -> None:
    """Refuse a chain this configuration cannot run, before any work."""
    missing = [k for k in ("policy_old", "policy_new") if k not in cfg.dataset]
    if missing:
        raise ValueError(f"shifts.policies chains policy shifts from the dataset's policy_old, and dataset "
                         f"{cfg.dataset.get('_target_')} has no {missing}")
    if not holds_ground_truth(cfg) and str(cfg.oracle.get("_target_", "")).endswith("LabelOracle"):
        raise ValueError("shifts.policies: a later shift triages the pairs the shift before relabelled "
                         "(data/relabelled.jsonl), which carry none of the dataset's own harm annotations that "
                         "oracle=labels reads; chain with a language-model oracle (oracle=openai)")
    if not holds_ground_truth(cfg) and cfg.data.get("splits") and cfg.data.get("eval_split") is None \
            and not cfg.dataset.get("test_path"):
        raise ValueError("shifts.policies: with data.splits and no data.eval_split, a later shift would have no "
                         "held-out prompts; name the split that evaluates (data.eval_split)")
    if cfg.model.get("from_run"):
        raise ValueError("shifts.policies starts the first shift from M_old and each next one from the shift before; "
                         f"model.from_run={cfg.model.from_run} would replace both: set one or the other")
    if cfg.method.get("retrain") and cfg.method.get("retrain_from", "base") == "base":
        log.info("shifts: %s re-trains from the base model at every shift (a reference, not a chain)", cfg.method.name)


def shift_config(cfg: DictConfig, k: int, policies: list[str], out: Path) -> DictConfig:
    """The run of shift k (1-based): pi_{k-1} -> pi_k, from M_old or the run of shift k-1."""
    # unresolved: what follows paths.output_dir (the logger's folder, say) follows it into the shift's folder
    s = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    s.shifts.policies = []  # a shift is one run, not a chain of its own
    if holds_ground_truth(cfg):
        s.dataset.policy_base = policies[0] if k > 1 else None
    elif k > 1:
        s.dataset = relabelled_source(cfg, out / SHIFT_DIR.format(k=k - 1))
        s.data.splits = GIVEN_SPLITS if cfg.data.get("splits") else None
        s.data.size = None  # the shift before kept only its subset: the organisation's D is what it trained on
    s.dataset.policy_old, s.dataset.policy_new = policies[k - 1], policies[k]
    s.model.from_run = str(out / SHIFT_DIR.format(k=k - 1)) if k > 1 else None
    # agreement with every policy of the chain, each under its own name (the user's own labels kept)
    s.eval.policies = {**{policy_label(p): p for p in policies}, **(cfg.eval.get("policies") or {})}
    s.paths.output_dir = str(out / SHIFT_DIR.format(k=k))
    return s


def relabelled_source(cfg: DictConfig, previous: Path) -> DictConfig:
    """The data of a later shift for a dataset without ground truth: the pairs the shift before relabelled,
    read as local pairs, and the same held-out prompts (the user's test file, or the eval split's pairs)."""
    return OmegaConf.create({
        "_target_": "trace_realign.data.sources.JsonlSource",
        "train_path": str(previous / "data" / RELABELLED_FILE),
        "test_path": cfg.dataset.get("test_path"),
        "policy_old": None, "policy_new": None,  # set by the shift
        "triaged": False,
        "layout": "trace",
    })


def run_shifts(cfg: DictConfig, run: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Run every shift in turn; each shift's metrics under shift<k>/. A shift's folder is an ordinary run
    folder: re-running the chain re-runs each shift, and a shift that was interrupted resumes."""
    start = time.time()
    check_chain(cfg)
    policies = chain_policies(cfg)
    out = Path(cfg.paths.output_dir)
    metrics: dict[str, Any] = {"shifts/count": float(len(policies) - 1)}
    for k in range(1, len(policies)):
        log.info("shift %d of %d: %s -> %s", k, len(policies) - 1, policies[k - 1], policies[k])
        stage = run(shift_config(cfg, k, policies, out))
        metrics.update({f"shift{k}/{key}": value for key, value in stage.items()})
    metrics["time/total_seconds"] = time.time() - start
    return metrics


GROUPS = {"shifted", "unchanged", "invert", "punish", "retain", "undecided"}  # TPA's other groups: not axes


def drift_lines(metrics: dict[str, Any], policies: list[str]) -> list[str]:
    """Agreement with each policy of the chain after each shift, overall and per axis, each with the
    half-width of its 95 % interval: console lines."""
    labels = [policy_label(p) for p in policies]
    prefix = f"shift1/eval/after/agree_{labels[0]}/"
    axes = sorted({k[len(prefix):] for k in metrics if k.startswith(prefix)} - GROUPS)

    def cell(k: int, label: str, axis: str | None) -> str:
        key, ci = (f"shift{k}/eval/after/agree_{label}{part}" + (f"/{axis}" if axis else "") for part in ("", "_ci95"))
        return f"{metrics[key]:.1f} ± {metrics[ci]:.1f}" if key in metrics and ci in metrics else "—"

    lines = ["", "  agreement with each policy after each shift (%, ± the 95 % interval's half-width)",
             f"  {'after':<8}{'policy':<16}" + "".join(f"{a:>14}" for a in ["all", *axes])]
    for k in range(1, len(policies)):
        for i, label in enumerate(labels):
            lines.append(f"  {f'shift {k}' if i == 0 else '':<8}{label[:15]:<16}"
                         + "".join(f"{cell(k, label, a):>14}" for a in [None, *axes]))
    return lines
