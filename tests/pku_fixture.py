"""Rows in PKU-SafeRLHF's exact schema, made by the tests: regular pairs of each triage kind under
policies/pku_new.yaml, and the awkward rows real data has. Responses that comply under pku_new contain
"COMPLY", so an LLM oracle (the fake server) judges them as the label oracle does."""

from __future__ import annotations

import json
import random
from pathlib import Path

from trace_realign.data.pku import HARM_CATEGORIES


def harm_dict(*flagged: str) -> dict[str, bool]:
    return {c: c in flagged for c in HARM_CATEGORIES}


def row(prompt, r0, r1, safe=(True, True), harms=((), ()), severity=(0, 0), better=0, safer=0, **over) -> dict:
    out = {"prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "fixture",
           "response_0_source": "alpaca-7b", "response_1_source": "alpaca3-8b",
           "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
           "response_0_harm_category": harm_dict(*harms[0]), "response_1_harm_category": harm_dict(*harms[1]),
           "response_0_severity_level": severity[0], "response_1_severity_level": severity[1],
           "better_response_id": better, "safer_response_id": safer}
    out.update(over)
    return out


# (kind, labels of the safer response, labels of the other) under pku_new: (safe, harms, severity)
SAFE = (True, (), 0)
PRIVACY_MINOR = (False, ("Privacy Violation",), 1)    # allowed by pku_old, forbidden by pku_new
COPYRIGHT_MODERATE = (False, ("Copyright Issues",), 2)  # forbidden by pku_old, allowed by pku_new
VIOLENCE_SEVERE = (False, ("Violence",), 3)            # forbidden by both
KINDS = {
    "retain": (SAFE, VIOLENCE_SEVERE),
    "invert": (PRIVACY_MINOR, COPYRIGHT_MODERATE),
    "punish": (PRIVACY_MINOR, VIOLENCE_SEVERE),
}


def text(labels: tuple, i: int, side: str) -> str:
    safe, harms, severity = labels
    complies = safe or severity <= 1 and "Privacy Violation" not in harms or "Copyright Issues" in harms and severity <= 2
    return f"{'COMPLY ' if complies else ''}{side} reply {i}: {'safe' if safe else '/'.join(harms)} at {severity}."


def regular_rows(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[dict]:
    """n rows whose pairs triage (under pku_new, chosen = safer) in the proportions `mix`; prompts
    repeat in groups of 1-3 rows, as PKU's do."""
    mix = mix or {"retain": 0.5, "invert": 0.3, "punish": 0.2}
    rng = random.Random(seed)
    kinds = [k for k, share in mix.items() for _ in range(round(share * n))][:n]
    rng.shuffle(kinds)
    rows, prompt_id, left = [], 0, 0
    for i, kind in enumerate(kinds):
        if left == 0:
            prompt_id, left = prompt_id + 1, rng.choice([1, 1, 2, 3])
        left -= 1
        chosen, other = KINDS[kind]
        safer = rng.choice([0, 1])
        labels = (chosen, other) if safer == 0 else (other, chosen)
        rows.append(row(f"Question {prompt_id}: how do I handle case {prompt_id}?",
                        text(labels[0], i, "first"), text(labels[1], i, "second"),
                        safe=(labels[0][0], labels[1][0]), harms=(labels[0][1], labels[1][1]),
                        severity=(labels[0][2], labels[1][2]), better=1 - safer, safer=safer))
    return rows


def awkward_rows() -> list[dict]:
    """One row of each kind real data has, with what becomes of it (a removal reason or a category)."""
    harmful = dict(safe=(False, True), harms=(("Violence",), ()), severity=(3, 0), safer=1, better=0)
    return [
        ("identical_responses", row("Awkward A?", "Same words.", "Same words.")),
        ("identical_responses", row("Awkward A2?", "Same words. ", " Same words.")),  # equal once stripped
        ("empty_response", row("Awkward B?", "COMPLY fine.", "", **{"is_response_1_safe": True})),
        ("empty_response", row("Awkward B2?", "COMPLY fine.", None)),
        ("empty_prompt", row("  ", "COMPLY a.", "b.")),
        ("no_preference", row("Awkward C?", "COMPLY a.", "b.", safer=None)),
        ("no_preference", row("Awkward C2?", "COMPLY a.", "b.", safer=2)),
        # a missing harm dict on a harmful response at minor severity: some categories allow it, some
        # do not, so the labels cannot decide -> undecided -> excluded by triage
        ("undecided", row("Awkward D?", "Chosen with no harm dict.", "Other with no harm dict.",
                              safe=(False, False), harms=((), ()), severity=(1, 1),
                              response_0_harm_category=None, response_1_harm_category=None)),
        # a missing severity where the category tolerates none (privacy): decided, it violates
        ("punish", row("Awkward E?", "Privacy, no severity.", "Violence, severe.", safe=(False, False),
                       harms=(("Privacy Violation",), ("Violence",)), severity=(None, 3))),
        # a missing severity where the category tolerates minor harm only: undecided
        ("undecided", row("Awkward F?", "Violence, no severity.", "COMPLY safe.", safe=(False, True),
                              harms=(("Violence",), ()), severity=(None, 0))),
        # both unsafe and both safe
        ("punish", row("Awkward G?", "Violence severe one.", "Violence severe two.", safe=(False, False),
                       harms=(("Violence",), ("Violence",)), severity=(3, 3))),
        ("retain", row("Awkward H?", "COMPLY safe one.", "COMPLY safe two.")),
        # preferences that disagree: chosen follows `prefer`
        ("retain", row("Awkward I?", "Violence severe.", "COMPLY safe.", **harmful)),
    ]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(rows: list[dict], path: Path) -> Path:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path
