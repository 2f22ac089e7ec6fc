"""Building M_old: each stage cached on its own, keyed by what it reads (its data's content and its
settings), reused, rebuilt when an input changes, never left half-written; and the stages' data for any
data source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_cfg

from trace_realign.core.records import PreferencePair, save_pairs
from trace_realign.data.sources import JsonlSource
from trace_realign.data.world import SyntheticWorld
from trace_realign.models.prealign import StageData, prealigned_model


class FakeStages:
    """Stands in for train.run: writes a model directory per stage and records what it was asked."""

    def __init__(self, fail_at: str | None = None):
        self.calls: list[str] = []
        self.starts: list[str] = []
        self.data: list[StageData] = []
        self.fail_at = fail_at

    def __call__(self, cfg, data):
        stage = data.stage
        assert cfg.select.enabled is False, "M_old must never be selected by pi_new"
        assert cfg.data.label_noise == 0.0 and cfg.data.size is None and cfg.data.splits is None, "M_old trains on all its data"
        assert cfg.quiet is True and cfg.model.lora.enabled is False
        self.calls.append(stage)
        self.starts.append(cfg.model.name_or_path)
        self.data.append(data)
        if stage == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        model = Path(cfg.paths.output_dir) / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"from": cfg.model.name_or_path, "stage": stage}))
        return {"train/loss": 0.5, "train/first_loss": 1.0, "train/seconds": 0.1}


@pytest.fixture
def cfg(tmp_path):
    return compose_cfg([f"paths.cache_dir={tmp_path / 'cache'}", "dataset.pairs_per_axis=6",
                        "dataset.test_prompts_per_axis=2"], tmp_path / "run")


@pytest.fixture
def world(cfg):
    return SyntheticWorld(seed=cfg.seed, pairs_per_axis=6, test_prompts_per_axis=2)


def build(cfg, tmp_path, world, stages, **kw):
    return prealigned_model(cfg, str(tmp_path / "base"), stages, world, **kw)


def test_built_once_then_reused(cfg, tmp_path, world):
    stages = FakeStages()
    path, m = build(cfg, tmp_path, world, stages)
    assert stages.calls == ["pretrain", "sft", "dpo"] and m["prealign/cached"] == 0.0
    assert m["prealign/stages_built"] == 3 and m["prealign/seconds"] > 0
    # each stage starts from the previous stage's model, the first from the base
    root = Path(cfg.paths.cache_dir) / "prealign"
    started = {d.name.split("-")[0]: json.loads((d / "config.json").read_text())["from"] for d in root.iterdir()}
    assert Path(path).parent == root and Path(path).name.startswith("dpo-")
    assert started["pretrain"] == str(tmp_path / "base")
    assert Path(started["sft"]).name.startswith("pretrain-") and Path(started["dpo"]).name.startswith("sft-")
    again = FakeStages()
    path2, m2 = build(cfg, tmp_path, world, again)
    assert path2 == path and again.calls == [] and m2["prealign/cached"] == 1.0
    assert m2["prealign/stages_built"] == 0 and m2["prealign/seconds"] == 0.0  # this run spent no time building
    assert m2["prealign/sft/loss"] == 0.5 and m2["prealign/dpo/first_loss"] == 1.0  # each stage's own record


def test_a_changed_stage_rebuilds_it_and_what_follows_only(cfg, tmp_path, world):
    first, _ = build(cfg, tmp_path, world, FakeStages())
    cfg.model.prealign.stages.sft.steps = 7
    stages = FakeStages()
    second, _ = build(cfg, tmp_path, world, stages)
    assert second != first and stages.calls == ["sft", "dpo"]  # pretraining is shared
    other_world = FakeStages()
    third, _ = build(cfg, tmp_path, SyntheticWorld(seed=5, pairs_per_axis=6, test_prompts_per_axis=2), other_world)
    # another seed draws other alignment data from the same base model: pretraining is shared again
    assert third not in (first, second) and other_world.calls == ["sft", "dpo"]


def test_changed_data_content_rebuilds(cfg, tmp_path):
    a = SyntheticWorld(seed=0, pairs_per_axis=6, test_prompts_per_axis=2)
    b = SyntheticWorld(seed=0, pairs_per_axis=7, test_prompts_per_axis=2)
    first, _ = build(cfg, tmp_path, a, FakeStages())
    stages = FakeStages()
    second, _ = build(cfg, tmp_path, b, stages)
    assert second != first and stages.calls == ["sft", "dpo"]


def test_settings_m_old_never_reads_do_not_change_it(cfg, tmp_path, world):
    first, _ = build(cfg, tmp_path, world, FakeStages())
    cfg.trainer.max_steps, cfg.optimizer.lr, cfg.loss.beta = 3, 0.5, 0.9
    cfg.impact.gamma, cfg.impact.gold_batch_size, cfg.objective.alpha_kl = 7.0, 3, 2.0
    cfg.select.enabled = not cfg.select.enabled
    cfg.oracle.noise = 0.2
    cfg.data.label_noise, cfg.data.size = 0.2, 10  # realignment's data plan
    cfg.model.lora.r = 2
    stages = FakeStages()
    second, _ = build(cfg, tmp_path, world, stages)
    assert second == first and stages.calls == []


def test_settings_m_old_reads_change_it(cfg, tmp_path, world):
    first, _ = build(cfg, tmp_path, world, FakeStages())
    for change in ("data.max_length=96", "model.prealign.stages.dpo.beta=0.5", "optimizer.weight_decay=0.1"):
        key, value = change.split("=")
        node, _, leaf = key.rpartition(".")
        cfg_node = cfg
        for part in node.split("."):
            cfg_node = cfg_node[part]
        old = cfg_node[leaf]
        cfg_node[leaf] = type(old)(float(value)) if not isinstance(old, str) else value
        stages = FakeStages()
        path, _ = build(cfg, tmp_path, world, stages)
        assert path != first and stages.calls, change
        cfg_node[leaf] = old


def test_other_arithmetic_rebuilds(cfg, tmp_path, world, monkeypatch):
    """A model trained under other threads or library versions has other last bits: never reused for this."""
    import torch

    import trace_realign.core.environment as environment

    first, _ = build(cfg, tmp_path, world, FakeStages())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        stages = FakeStages()
        other_threads, _ = build(cfg, tmp_path, world, stages)
        assert other_threads != first and stages.calls == ["pretrain", "sft", "dpo"]
    finally:
        torch.set_num_threads(threads)
    real = environment.versions
    monkeypatch.setattr(environment, "versions", lambda names: {**real(names), "transformers": "0.0.1"})
    stages = FakeStages()
    other_release, _ = build(cfg, tmp_path, world, stages)
    assert other_release not in (first, other_threads) and stages.calls == ["pretrain", "sft", "dpo"]
    recorded = json.loads((Path(other_release) / "stage_key.json").read_text())["arithmetic"]
    assert recorded["libraries"]["transformers"] == "0.0.1" and recorded["device"] == "cpu"
    monkeypatch.setattr(environment, "versions", real)
    again = FakeStages()
    assert build(cfg, tmp_path, world, again)[0] == first and again.calls == []


def test_an_interrupted_build_leaves_no_cache_for_that_stage(cfg, tmp_path, world):
    with pytest.raises(KeyboardInterrupt):
        build(cfg, tmp_path, world, FakeStages(fail_at="dpo"))
    root = Path(cfg.paths.cache_dir) / "prealign"
    assert not list(root.glob("dpo-*")) and not list(root.glob(".*"))
    stages = FakeStages()
    build(cfg, tmp_path, world, stages)
    assert stages.calls == ["dpo"]  # the finished stages before it are kept


def test_labels_new_is_the_retraining_upper_bound(cfg, tmp_path, world):
    old_stages, new_stages = FakeStages(), FakeStages()
    m_old, _ = build(cfg, tmp_path, world, old_stages)
    m_gold, metrics = build(cfg, tmp_path, world, new_stages, labels="new")
    assert m_gold != m_old and new_stages.calls == ["sft", "dpo"]  # the same pretrained base
    assert metrics["retrain/cached"] == 0.0
    assert new_stages.data[-1].train_pairs() != old_stages.data[-1].train_pairs()
    assert [p.category for p in new_stages.data[-1].train_pairs()] == ["retain"] * len(new_stages.data[-1].train_pairs())


def test_some_stages_from_m_old_are_fine_tuning_with_perfect_labels(cfg, tmp_path, world):
    m_old, _ = build(cfg, tmp_path, world, FakeStages())
    stages = FakeStages()
    tuned, metrics = prealigned_model(cfg, m_old, stages, world, labels="new", only=["sft", "dpo"], prefix="finetune")
    assert stages.calls == ["sft", "dpo"] and stages.starts[0] == m_old  # no pretraining: it starts from M_old
    assert metrics["finetune/stages_built"] == 2.0 and tuned != m_old
    assert stages.data[-1].labels == "new"
    with pytest.raises(ValueError, match="retrain_stages"):
        prealigned_model(cfg, m_old, FakeStages(), world, labels="new", only=["rlhf"])


def test_generic_stages_for_a_source_of_annotated_pairs(tmp_path):
    pairs = [PreferencePair(f"prompt {i}", f"good {i}", f"bad {i}") for i in range(3)]
    save_pairs(pairs, tmp_path / "train.jsonl")
    source = JsonlSource(str(tmp_path / "train.jsonl"), None, "pi_old", "pi_new")
    pretrain, sft, dpo = (StageData(source, s).train_pairs() for s in ("pretrain", "sft", "dpo"))
    assert [p.chosen for p in pretrain] == ["good 0", "bad 0", "good 1", "bad 1", "good 2", "bad 2"]
    assert [(p.prompt, p.chosen, p.rejected) for p in sft] == [(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert dpo == sft and all(p.category == "retain" for p in pretrain + sft)
    with pytest.raises(ValueError, match="pi_new's labels"):
        StageData(source, "sft", labels="new")


@pytest.mark.parametrize("oracle", ["labels", "openai", "programmatic"])
def test_a_stage_builds_no_oracle_of_the_run(tmp_path, oracle):
    """A stage's data come labelled: the run's oracle (one bound to PKU's annotations, one over an API) is
    not built for it, and the base oracle it gets instead can be bound to the stage's data."""
    from trace_realign.models.prealign import stage_config
    from trace_realign.oracle.base import Oracle, build_oracles

    cfg = compose_cfg(["dataset=jsonl", f"dataset.train_path={tmp_path / 'train.jsonl'}", f"oracle={oracle}",
                       "oracle.noise=0.1"], tmp_path / "run")
    save_pairs([PreferencePair("p", "good", "bad")], tmp_path / "train.jsonl")
    s = stage_config(cfg, "sft", cfg.model.prealign.stages.sft, "base", tmp_path / "stage")
    data = StageData(JsonlSource(str(tmp_path / "train.jsonl"), None, "pi_old", "pi_new"), "sft")
    used, judge = build_oracles(s.oracle, s.seed, data)
    assert type(used) is Oracle and judge is used and "judge" not in s
