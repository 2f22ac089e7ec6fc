"""Oracle throughput: N judgments against a local OpenAI-compatible server with fixed latency.

    python experiments/benchmark_oracle.py                       # 1000 judgments, 200 ms, concurrency 32

Then repeats the same judgments with a fresh oracle on the same cache: it must make no call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402

from trace_realign.oracle.base import Policy  # noqa: E402
from trace_realign.oracle.llm import OpenAIOracle  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    server = FakeOpenAI(latency=args.latency)
    policy = Policy(name="bench", text="Comply when the response says COMPLY.")
    items = [(f"prompt {i}", "COMPLY" if i % 3 else "no") for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "verdicts.jsonl")
        first = OpenAIOracle(model="bench", base_url=server.url, concurrency=args.concurrency, cache_path=cache,
                             progress=sys.stderr.isatty())
        start = time.time()
        verdicts = first.judge_batch(items, policy)
        wall = time.time() - start
        second = OpenAIOracle(model="bench", base_url=server.url, concurrency=args.concurrency, cache_path=cache)
        start2 = time.time()
        again = second.judge_batch(items, policy)
        wall2 = time.time() - start2
    server.close()
    wrong = sum(v != bool(i % 3) for i, v in enumerate(verdicts))
    print(f"{args.n} judgments, {args.latency * 1000:.0f} ms latency, concurrency {args.concurrency}: "
          f"{wall:.2f} s ({args.n / wall:.0f}/s), calls {first.metrics()['oracle/calls']:.0f}, "
          f"retries {first.metrics()['oracle/retries']:.0f}, wrong {wrong}")
    print(f"identical re-run: {wall2:.2f} s, calls {second.metrics()['oracle/calls']:.0f}, "
          f"cached {second.metrics()['oracle/cached']:.0f}, same verdicts {again == verdicts}")


if __name__ == "__main__":
    main()
