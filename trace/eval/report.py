"""The few lines a run prints: before -> after, with intervals, and what it says."""

from __future__ import annotations

from typing import Any


def _ci_key(when: str, key: str) -> str:
    name, _, group = key.partition("/")
    return f"eval/{when}/{name}_ci95" + (f"/{group}" if group else "")


def verdict(metrics: dict[str, Any], tolerance: float = 2.0) -> list[str]:
    """A few lines a newcomer can read: before -> after with 95 % intervals on the shifted and unchanged
    axes (or overall TPA) and utility, and whether realignment happened and what it cost."""
    def cell(when: str, key: str) -> str:
        v = metrics.get(f"eval/{when}/{key}")
        if v is None:
            return "-"
        ci = metrics.get(_ci_key(when, key))
        return f"{v:5.1f} ±{ci:4.1f}" if ci is not None else f"{v:5.1f}"

    shifted = "eval/before/tpa/shifted" in metrics
    rows = ([("TPA, shifted axes", "tpa/shifted"), ("TPA, unchanged axes", "tpa/unchanged")] if shifted
            else [("TPA (pi_new)", "tpa")] + [(f"TPA, {c} prompts", f"tpa/{c}") for c in ("invert", "punish", "retain")
                                             if f"eval/before/tpa/{c}" in metrics])
    rows += [("utility", "utility")]
    rows = [(label, key) for label, key in rows if f"eval/after/{key}" in metrics]
    if not rows:
        return []
    width = max(len(label) for label, _ in rows)
    lines = [f"  {'':<{width}}  {'before':>11}  {'after':>11}  change"]
    for label, key in rows:
        b, a = metrics.get(f"eval/before/{key}"), metrics[f"eval/after/{key}"]
        change = "" if b is None else f"{a - b:+.1f}"
        lines.append(f"  {label:<{width}}  {cell('before', key):>11}  {cell('after', key):>11}  {change}")

    target = "tpa/shifted" if shifted else "tpa"
    b, a = metrics.get(f"eval/before/{target}"), metrics.get(f"eval/after/{target}")
    if b is None or a is None:
        return lines
    b_hi = b + metrics.get(_ci_key("before", target), 0.0)
    a_lo = a - metrics.get(_ci_key("after", target), 0.0)
    where = "on the shifted axes" if shifted else "overall"
    if a_lo > b_hi:
        said = f"realigned: TPA {where} rose from {b:.1f} to {a:.1f} (the 95 % intervals do not overlap)"
    elif a > b:
        said = f"not shown to realign: TPA {where} rose from {b:.1f} to {a:.1f}, within the noise of the 95 % intervals"
    else:
        said = f"not realigned: TPA {where} went from {b:.1f} to {a:.1f}"
    costs = []
    for label, key in (("unchanged axes", "tpa/unchanged"), ("utility", "utility")):
        before, after = metrics.get(f"eval/before/{key}"), metrics.get(f"eval/after/{key}")
        if before is not None and after is not None:
            costs.append(f"{label} kept ({after - before:+.1f})" if after >= before - tolerance
                         else f"{label} fell by {before - after:.1f} points")
    lines.append("  verdict: " + said + ("; " + ", ".join(costs) if costs else ""))
    return lines
