"""The oracle: the interface that judges a response against a policy (base), the OpenAI-compatible judge
and corrector (llm) with its durable answer store (verdicts), and triage (Stage 1, Algorithm 1 lines 1-7)."""

from trace_realign.oracle.base import (
    NoisyOracle,
    Oracle,
    OracleFailuresError,
    Policy,
    build_oracles,
    failure_summary,
    read_policy_file,
)

__all__ = ["NoisyOracle", "Oracle", "OracleFailuresError", "Policy", "build_oracles", "failure_summary", "read_policy_file"]
