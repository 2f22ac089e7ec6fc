"""A model that cannot be loaded (a hub id offline, a wrong path, an empty directory) stops the run with
an error naming model.name_or_path and model.revision and saying how to give a local copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
from trace_realign.models.loading import ModelNotFoundError, load_policy, load_tokenizer

cfg = {"revision": None, "lora": {"enabled": False}}
out = {}
for name in sys.argv[1:]:
    for what, load in (("tokenizer", load_tokenizer), ("model", load_policy)):
        try:
            load(name, cfg)
            out[f"{name}:{what}"] = "loaded"
        except ModelNotFoundError as exc:
            out[f"{name}:{what}"] = str(exc)
print(json.dumps(out))
"""


def test_unloadable_models_are_named_with_the_fix(tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    names = ["nobody-here/no-such-model", str(tmp_path / "no" / "such" / "dir"), str(empty)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", SCRIPT, *names], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for what in ("tokenizer", "model"):
        hub = out[f"{names[0]}:{what}"]
        assert hub.startswith("model.name_or_path='nobody-here/no-such-model' (model.revision=null)"), hub
        assert f"its {what} could not be found locally" in hub and "downloaded from the hub" in hub
        assert "model.name_or_path=/path/to/model" in hub and "HF_HUB_OFFLINE" in hub
        missing = out[f"{names[1]}:{what}"]
        assert "no such local directory" in missing and "model.name_or_path=/path/to/model" in missing
        assert f"holds no {what} that transformers can load" in out[f"{names[2]}:{what}"]


def test_gguf_file_is_read_where_it_is_and_ordinary_weights_elsewhere(tmp_path):
    from trace_realign.models.loading import gguf_file_at

    cfg = {"gguf_file": "model.Q4_1.gguf"}
    assert gguf_file_at("some-org/some-model", cfg) == "model.Q4_1.gguf"  # a hub repository holds it
    assert gguf_file_at(str(tmp_path), cfg) is None  # a folder without it: a run's adapter/ or model/
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"")
    assert gguf_file_at(str(tmp_path), cfg) == "model.Q4_1.gguf"
    assert gguf_file_at(str(tmp_path), {"gguf_file": None}) is None
