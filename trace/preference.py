"""`trace-preference`: the preference kit (trace_realign.eval.preference) from the shell.

    trace-preference export --responses DPO-Gold=gold.jsonl --responses TRACE=trace.jsonl \\
        --responses U2A=u2a.jsonl --policy pi_new --out kit/
    trace-preference annotate kit/ --world                  # or --llm --model gpt-4o --k 3
    trace-preference import kit/ --baseline TRACE           # a table; kit/metrics.json

Give annotators kit/instructions.md and kit/items.csv (or items.jsonl); their returned files go to
kit/annotations/. Machine annotators write machine-<name>.csv there, which import reads like any other.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from trace_realign.eval.base import JudgeFailed
from trace_realign.eval.preference import (
    INTERVALS,
    TIES,
    AnnotationError,
    KitError,
    LLMAnnotators,
    MachineAnnotator,
    OracleAnnotator,
    annotate_kit,
    export_kit,
    load_kit,
    preference_metrics,
    read_annotations,
    render_table,
    write_metrics,
)
from trace_realign.oracle.base import Policy


def read_responses(specs: Sequence[str]) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]]]:
    """Items and each model's responses from NAME=PATH specs: JSON lines with "prompt" and "response"
    (or a run's generations.jsonl, whose after.response is taken). Every file must hold the same prompts
    in the same order."""
    items: list[dict[str, Any]] = []
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise KitError(f"--responses {spec!r}: expected NAME=PATH")
        texts = []
        with open(path, encoding="utf-8") as fh:
            rows = [(n, line) for n, line in enumerate(fh, start=1) if line.strip()]
        for i, (n, line) in enumerate(rows):
            try:
                row = json.loads(line)
                text = row["response"] if "response" in row else row["after"]["response"]
                prompt = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise KitError(f"{path}:{n}: expected a JSON object with prompt and response "
                               "(or after.response)") from None
            if not out:
                items.append({k: v for k, v in row.items() if k not in ("response", "before", "after")})
            elif i >= len(items) or items[i]["prompt"] != prompt:
                raise KitError(f"{path}:{n}: prompt differs from line {i + 1} of the first file; every file must "
                               "answer the same prompts in the same order")
            texts.append(text)
        out.append((name, texts))
    return items, out


def read_policy(name_or_path: str) -> Policy:
    """A policy for the instructions: a .txt or .md file (its text), else a policy YAML or the name of a
    shipped one (the embedded world's, then PKU-SafeRLHF's label policies)."""
    path = Path(name_or_path)
    if path.suffix in (".txt", ".md"):
        return Policy(path.stem, path.read_text(encoding="utf-8").strip())
    from trace_realign.core.records import DataError
    from trace_realign.data.world import load_policy

    try:
        return load_policy(name_or_path)
    except DataError as world_error:
        from trace_realign.data.pku import load_label_policy

        try:
            return load_label_policy(name_or_path)
        except DataError:
            raise KitError(f"--policy {name_or_path}: {world_error}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trace-preference", description="Blind preference comparisons of models: "
                                "export a kit, let machines annotate it, import annotations to win rates and alpha.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a kit for annotators")
    e.add_argument("--responses", action="append", required=True, metavar="NAME=PATH",
                   help="a model's responses (JSON lines with prompt and response, or a run's generations.jsonl); "
                        "once per model, two or more")
    e.add_argument("--policy", required=True, help="the policy to judge by: a .txt/.md file, a policy YAML or a name")
    e.add_argument("--out", required=True, type=Path, help="the kit folder")
    e.add_argument("--seed", type=int, default=0, help="draws the letters of each item (default 0)")
    e.add_argument("--overwrite", action="store_true", help="replace a different kit in --out")
    a = sub.add_parser("annotate", help="machine annotators fill in a kit (annotations/machine-*.csv)")
    a.add_argument("kit", type=Path)
    who = a.add_mutually_exclusive_group(required=True)
    who.add_argument("--world", action="store_true", help="the embedded world's judge (needs a world policy)")
    who.add_argument("--llm", action="store_true", help="k LLM judges over an OpenAI-compatible API")
    a.add_argument("--model", default="gpt-4o")
    a.add_argument("--base-url", default=None, help="a non-OpenAI server (vLLM, Ollama, ...)")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the key")
    a.add_argument("--k", type=int, default=3, help="LLM judges, seeds 0..k-1 (default 3)")
    a.add_argument("--temperature", type=float, default=0.7)
    a.add_argument("--concurrency", type=int, default=16)
    a.add_argument("--price-input-per-m", type=float, default=0.0, help="USD per million input tokens")
    a.add_argument("--price-output-per-m", type=float, default=0.0, help="USD per million output tokens")
    i = sub.add_parser("import", help="read annotations: win rates with intervals, alpha; writes metrics JSON")
    i.add_argument("kit", type=Path)
    i.add_argument("files", nargs="*", type=Path, help="annotation files or folders (default: KIT/annotations)")
    i.add_argument("--baseline", help="the model the others are compared with first (default: the first)")
    i.add_argument("--ties", choices=TIES, default="half", help="a tie as half a win (default) or left out")
    i.add_argument("--interval", choices=INTERVALS, default="bootstrap")
    i.add_argument("--resamples", type=int, default=2000)
    i.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    i.add_argument("--out", type=Path, help="metrics JSON (default: KIT/metrics.json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from trace_realign.oracle.llm import OracleConfigError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "export":
            items, responses = read_responses(args.responses)
            out = export_kit(items, responses, args.out, args.seed, policy=read_policy(args.policy),
                             overwrite=args.overwrite)
            print(f"wrote a kit of {len(items)} items and {len(responses)} models to {out}: give annotators "
                  f"instructions.md and items.csv (or items.jsonl); keep key.json from them")
        elif args.command == "annotate":
            annotator = _cli_annotator(args)
            try:
                paths = annotate_kit(args.kit, annotator)
            finally:
                for k, v in sorted(annotator.metrics().items()):
                    print(f"  {k}  {v:g}")
            for path in paths:
                print(f"wrote {path} (machine-annotated)")
        else:
            annotations = read_annotations(args.kit, args.files)
            metrics = preference_metrics(annotations, args.baseline, args.ties, args.interval, args.resamples,
                                         args.seed)
            out = args.out or args.kit / "metrics.json"
            print(render_table(metrics, annotations, args.baseline))
            write_metrics(out, metrics)
            print(f"wrote {out}")
    except (KitError, AnnotationError, JudgeFailed, OracleConfigError, OSError) as exc:
        print(f"trace-preference: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cli_annotator(args: argparse.Namespace) -> MachineAnnotator:
    if args.world:
        from trace_realign.data.world import WorldJudge

        if not load_kit(args.kit).policy.rules:
            raise KitError(f"{args.kit}: the world's judge needs a policy with rules (export with a world policy)")
        return OracleAnnotator(WorldJudge())
    return LLMAnnotators(model=args.model, k=args.k, temperature=args.temperature, base_url=args.base_url,
                         api_key_env=args.api_key_env, concurrency=args.concurrency,
                         price_input_per_m=args.price_input_per_m, price_output_per_m=args.price_output_per_m)


if __name__ == "__main__":
    sys.exit(main())
