"""A durable store of oracle answers: every paid verdict is kept, once.

Answers are appended to a JSON-lines file as they arrive, each line flushed and fsynced, so a run killed
at any moment (SIGKILL included) loses at most the line being written. On reopening, a torn last line is
ignored and counted; later lines for a key already stored are ignored, so nothing is counted twice. Keys
are content hashes of everything that decides an answer: (model, server, policy, prompt, response,
template version, sampling settings), so an identical re-run asks nothing and any change asks again.

Only answers are stored. A failed call (rate limited, timed out, unreadable) is no answer: it is asked
again by the next run. Rows with `failed` written by older versions are ignored on loading, and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

KEY_VERSION = "verdict-key-v2"  # v1 keys named neither the server nor the sampling settings
OPENAI_SERVER = "api.openai.com"


def server_id(base_url: str | None) -> str:
    """The server a base URL names, as host[:port]/path without scheme or trailing slash; OpenAI's own
    API (no base URL, or its default one) is "api.openai.com"."""
    if not base_url:
        return OPENAI_SERVER
    parts = urlsplit(base_url if "://" in base_url else f"//{base_url}")
    server = (parts.netloc.lower() + parts.path.rstrip("/")) or base_url
    return OPENAI_SERVER if server == f"{OPENAI_SERVER}/v1" else server


def verdict_key(model: str, policy_text: str, prompt: str, response: str, template_version: str, *,
                server: str, sampling: Mapping[str, Any]) -> str:
    """The key of one answer: every input that decides it (`server` as server_id gives it; `sampling`:
    every sampling setting the request carries, e.g. temperature and max_tokens)."""
    policy_hash = hashlib.sha256(policy_text.encode()).hexdigest()
    blob = json.dumps([KEY_VERSION, model, server, policy_hash, prompt, response, template_version,
                       sorted(sampling.items())], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class VerdictStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.answers: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        self.duplicate_lines = 0
        self.failed_lines = 0
        if self.path.is_file():
            self._load()
        self._fh = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        with self.path.open("r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    key = row["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn_lines += 1  # a write cut short by a kill: that item will be asked again
                    continue
                if "failed" in row:
                    self.failed_lines += 1  # a failure stored by an older version: asked again
                    continue
                if key in self.answers:
                    self.duplicate_lines += 1
                    continue
                self.answers[key] = row
        if self.torn_lines:
            # Drop torn bytes so the next append starts on a fresh line.
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in self.answers.values():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.answers

    def __len__(self) -> int:
        return len(self.answers)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.answers.get(key)

    def put(self, key: str, answer: dict[str, Any]) -> bool:
        """Store an answer durably; False (and nothing written) if the key is already stored."""
        if "failed" in answer:
            raise ValueError("a failed call is no answer: it is asked again, never stored")
        if key in self.answers:
            return False
        row = {"key": key, **answer}
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.answers[key] = row
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.answers.values())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "VerdictStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
