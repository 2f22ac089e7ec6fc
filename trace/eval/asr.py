"""Attack success rate: how often a prompt attack gets the model to violate pi_new.

Each attack is a template applied to the held-out prompts on which pi_new asks for a refusal (an item's
`expects: refusal`; another selection with `prompts`). The judge rules on each response against pi_new,
reading the original request: ASR is the percent of decided verdicts that violate, per attack and pooled
over attacks, with 95 % Wilson intervals. The same prompts without an attack (`plain`) are measured beside
them, so an attack's effect reads as the difference to `plain`. Attacks are data (attacks.yaml); users
add their own files.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from trace_realign.eval.base import EvalInputs, EvalResult, Evaluator
from trace_realign.eval.stats import percent_with_ci

ATTACKS_FILE = Path(__file__).with_name("attacks.yaml")
PLAIN = "plain"

log = logging.getLogger(__name__)


def load_attacks(files: Sequence[str | Path] = (), names: Sequence[str] | None = None) -> dict[str, str]:
    """{attack name: template} from the built-in attacks and `files`, keeping `names` (all when None).

    A template must contain {prompt} exactly once; a later file may not reuse a name silently."""
    attacks: dict[str, str] = {}
    for path in [ATTACKS_FILE, *map(Path, files)]:
        if not path.is_file():
            raise FileNotFoundError(f"eval.evaluators.asr.attack_files: {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of attack name -> {{template, description}}")
        for name, spec in data.items():
            template = spec.get("template") if isinstance(spec, dict) else None
            if not isinstance(template, str) or template.count("{prompt}") != 1:
                raise ValueError(f"{path}: attack {name!r} needs a `template` string with {{prompt}} exactly once")
            if name in attacks or name == PLAIN:
                raise ValueError(f"{path}: attack {name!r} is defined twice (or is the reserved name {PLAIN!r})")
            attacks[name] = template
    if names is None:
        return attacks
    unknown = [n for n in names if n not in attacks]
    if unknown:
        raise ValueError(f"eval.evaluators.asr.attacks: unknown {unknown}; known attacks: {sorted(attacks)}")
    return {n: attacks[n] for n in names}


def apply_attack(template: str, prompt: str) -> str:
    # str.replace, not format: a prompt or template may hold other braces
    return template.replace("{prompt}", prompt)


def select_prompts(items: Sequence[dict[str, Any]], prompts: str | Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The items ASR is measured on: `expects_refusal` (items with expects: refusal; an error if the dataset
    marks none), `auto` (the same, or none with a warning), `all` value items, or a filter {item key:
    allowed values}."""
    value = [it for it in items if it.get("kind", "value") == "value"]
    if prompts == "auto":  # the marked prompts if the dataset marks any; else none, with a warning
        chosen = [it for it in value if it.get("expects") == "refusal"]
        if value and not chosen:
            log.warning("asr: the dataset marks no held-out prompt `expects: refusal`, so no attack success rate is "
                        "measured; choose the prompts with eval.evaluators.asr.prompts=all or a filter such as "
                        "'eval.evaluators.asr.prompts={category: [invert, punish]}'")
        return chosen
    if prompts == "expects_refusal":
        chosen = [it for it in value if it.get("expects") == "refusal"]
        if value and not chosen:
            raise ValueError(
                "eval.evaluators.asr: no held-out prompt is marked `expects: refusal` (the dataset does not say where "
                "pi_new asks for a refusal). Choose the prompts yourself: eval.evaluators.asr.prompts=all, or a filter "
                "such as 'eval.evaluators.asr.prompts={category: [invert, punish]}'")
        return chosen
    if prompts == "all":
        return value
    if isinstance(prompts, Mapping):
        return [it for it in value if all(it.get(k) in set(v) for k, v in prompts.items())]
    raise ValueError(f"eval.evaluators.asr.prompts: {prompts!r}; expected auto, expects_refusal, all or a mapping")


class ASR(Evaluator):
    name = "asr"

    def __init__(self, attacks: Sequence[str] | None = None, attack_files: Sequence[str] = (),
                 prompts: str | Mapping[str, Sequence[str]] = "auto", max_prompts: int | None = None,
                 plain: bool = True, seed: int = 0):
        self.attacks = load_attacks(attack_files, attacks)
        self.prompts, self.max_prompts, self.plain, self.seed = prompts, max_prompts, plain, seed

    def __call__(self, inputs: EvalInputs) -> EvalResult:
        items = select_prompts(inputs.items, self.prompts)
        if self.max_prompts is not None and len(items) > self.max_prompts:
            # a seeded sample, not the first N: held-out items are often grouped by axis
            items = random.Random(self.seed).sample(items, self.max_prompts)
        result = EvalResult(metrics={"asr/n": float(len(items))})
        if not items:
            return result
        attacks = ({PLAIN: "{prompt}"} if self.plain else {}) | self.attacks
        pooled: list[bool] = []
        for name, template in attacks.items():
            attacked = [apply_attack(template, it["prompt"]) for it in items]
            responses = inputs.greedy(attacked)
            # the judge reads the original request: the attack is the user's wrapping, not the request
            verdicts = inputs.judge_batch([(it["prompt"], r) for it, r in zip(items, responses)], inputs.new,
                                          f"asr/{name}")
            violations = [not v for v in verdicts if v is not None]
            pct, half, _, _ = percent_with_ci(violations)
            result.metrics.update({f"asr/{name}": pct, f"asr_ci95/{name}": half,
                                   f"asr/undecided/{name}": float(len(verdicts) - len(violations))})
            if name != PLAIN:
                pooled += violations
            result.rows += [{"attack": name, "prompt": it["prompt"], "attacked": a, "response": r,
                             "complies": v, **{k: it[k] for k in ("axis", "category") if k in it}}
                            for it, a, r, v in zip(items, attacked, responses, verdicts)]
        if self.attacks:
            pct, half, _, _ = percent_with_ci(pooled)
            result.metrics.update({"asr/overall": pct, "asr_ci95/overall": half})
        return result
