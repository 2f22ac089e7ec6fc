"""The stored "before" evaluation (trace_realign.eval.cache): reused only where the same inputs would
give the same numbers, relocated into the run that reads it, and never stored after a failed judge call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trace_realign.eval import GenerationSettings
from trace_realign.eval import cache as eval_cache
from trace_realign.oracle.base import Policy

CPU = torch.device("cpu")


class Judge:
    def __init__(self, name: str = "judge-a") -> None:
        self.name, self.failed_calls = name, 0

    def fingerprint(self) -> str:
        return self.name


def built_model(root: Path, name: str = "dpo-0123456789abcdef") -> str:
    """A folder as the package's model stages leave one (its name hashes what built it)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "stage_key.json").write_text(json.dumps({"stage": "dpo"}))
    return str(path)


def evaluation(judge: Judge | None = None, items: list | None = None, new: str = "pi_new", max_new_tokens: int = 4) -> dict:
    return dict(judge=judge or Judge(), new=Policy(new, f"{new} text"), old=Policy("pi_old", "pi_old text"),
                items=items if items is not None else [{"prompt": "p1", "axis": "medical"}],
                settings=GenerationSettings(max_new_tokens=max_new_tokens), policies={})


def test_a_model_this_package_did_not_build_is_never_cached(make_cfg, tmp_path):
    cfg = make_cfg()
    plain = tmp_path / "hub-like"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert eval_cache.evaluation_key(cfg, str(plain), evaluation(), CPU) is None
    assert eval_cache.evaluation_key(cfg, "Qwen/Qwen2.5-7B-Instruct", evaluation(), CPU) is None
    assert eval_cache.evaluation_key(cfg, built_model(tmp_path), evaluation(), CPU) is not None


def test_the_key_follows_everything_the_evaluation_reads(make_cfg, tmp_path):
    cfg = make_cfg()
    model = built_model(tmp_path)
    key = eval_cache.evaluation_key(cfg, model, evaluation(), CPU)
    assert eval_cache.evaluation_key(cfg, model, evaluation(), CPU) == key  # the same inputs, the same key
    # every input changed once gives a key of its own
    changed = [
        eval_cache.evaluation_key(cfg, built_model(tmp_path, "dpo-fedcba9876543210"), evaluation(), CPU),
        eval_cache.evaluation_key(cfg, model, evaluation(judge=Judge("judge-b")), CPU),
        eval_cache.evaluation_key(cfg, model, evaluation(items=[{"prompt": "p2", "axis": "medical"}]), CPU),
        eval_cache.evaluation_key(cfg, model, evaluation(new="pi_2"), CPU),
        eval_cache.evaluation_key(cfg, model, evaluation(max_new_tokens=8), CPU),
        eval_cache.evaluation_key(make_cfg("eval.evaluators.asr=null"), model, evaluation(), CPU),
        eval_cache.evaluation_key(make_cfg("model.lora.r=4"), model, evaluation(), CPU),
        eval_cache.evaluation_key(make_cfg("seed=3"), model, evaluation(), CPU),
        eval_cache.evaluation_key(cfg, model, evaluation(), torch.device("meta")),
    ]
    assert len({key, *changed}) == len(changed) + 1
    # what training does with the model is no part of it: every method of a seed shares M_old's evaluation
    for other in ("method=dpo_gold", "optimizer.lr=0.5", "trainer.max_steps=9", "loss=ipo"):
        assert eval_cache.evaluation_key(make_cfg(other), model, evaluation(), CPU) == key, other


def test_a_stored_evaluation_comes_back_whole_and_names_the_run_that_reads_it(make_cfg, tmp_path):
    cfg = make_cfg("eval.cache_before=true", f"paths.cache_dir={tmp_path / 'cache'}")
    first, second = tmp_path / "first", tmp_path / "second"
    ev, model = evaluation(), built_model(tmp_path / "models")
    files = first / "eval" / "before" / "capability"
    metrics = {"eval/before/tpa": 12.5, "eval/before/utility": 100.0}
    items = {0: {"response": "r", "complies": True}}
    rows = {"asr": [{"attack": "a", "refused": False}]}
    calls = []

    def evaluate():
        calls.append(1)
        (files / "tasks" / "datasets_cache").mkdir(parents=True)
        (files / "tasks" / "task.yaml").write_text(f"data_files: {first}/eval/before/capability/tasks/t.jsonl\n")
        (files / "tasks" / "datasets_cache" / "json-test.arrow").write_bytes(b"\0arrow")
        (files / "results.bin").write_bytes(b"\0\1")
        return metrics, items, rows

    got = eval_cache.evaluate_before(cfg, model, ev, CPU, first, evaluate)
    assert got == (metrics, items, rows, False) and len(calls) == 1
    again = eval_cache.evaluate_before(cfg, model, ev, CPU, second, evaluate)
    assert again == (metrics, items, rows, True) and len(calls) == 1  # read, not evaluated again
    copied = second / "eval" / "before" / "capability"
    assert (copied / "tasks" / "task.yaml").read_text() == f"data_files: {second}/eval/before/capability/tasks/t.jsonl\n"
    assert (copied / "results.bin").read_bytes() == b"\0\1"
    assert not (copied / "tasks" / "datasets_cache").exists()  # the datasets library rebuilds its own cache


@pytest.mark.parametrize("override", ["eval.cache_before=false", None])
def test_nothing_is_stored_when_switched_off_or_after_a_failed_judge_call(make_cfg, tmp_path, override):
    cfg = make_cfg(f"paths.cache_dir={tmp_path / 'cache'}", *([override] if override else []))
    ev, model = evaluation(), built_model(tmp_path / "models")
    calls = []

    def evaluate():
        calls.append(1)
        if override is None:
            ev["judge"].failed_calls += 1  # one verdict was never given: the numbers rest on fewer calls
        return {"eval/before/tpa": 1.0}, {}, {}

    for n in range(2):
        *_, cached = eval_cache.evaluate_before(cfg, model, ev, CPU, tmp_path / f"run{n}", evaluate)
        assert not cached
    assert len(calls) == 2
    assert not list((Path(cfg.paths.cache_dir) / "eval_before").glob("*/result.json"))
