"""M_old's cache: built once, reused, rebuilt when its config changes, never left half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import compose_cfg
from trace_realign.prealign import prealigned_model


class FakeStages:
    """Stands in for train.run: writes a model directory per stage and records what it was asked."""

    def __init__(self, fail_at: str | None = None):
        self.calls: list[str] = []
        self.fail_at = fail_at

    def __call__(self, cfg):
        stage = cfg.dataset.stage
        assert cfg.select.enabled is False, "M_old must never be selected by pi_new"
        assert cfg.data.label_noise == 0.0 and cfg.data.size is None and cfg.data.splits is None, "M_old trains on all its data"
        self.calls.append(stage)
        if stage == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        model = Path(cfg.paths.output_dir) / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"from": cfg.model.name_or_path, "stage": stage}))
        return {"train/loss": 0.5, "train/first_loss": 1.0, "train/seconds": 0.1}


@pytest.fixture
def cfg(tmp_path):
    c = compose_cfg([f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    return c


def test_built_once_then_reused(cfg, tmp_path):
    stages = FakeStages()
    path, m = prealigned_model(cfg, str(tmp_path / "base"), stages)
    assert stages.calls == ["pretrain", "sft", "dpo"] and m["prealign/cached"] == 0.0
    # each stage starts from the previous stage's model
    assert json.loads((Path(path) / "config.json").read_text())["from"].endswith("sft/model")
    again = FakeStages()
    path2, m2 = prealigned_model(cfg, str(tmp_path / "base"), again)
    assert path2 == path and again.calls == [] and m2["prealign/cached"] == 1.0
    assert m2["prealign/sft/loss"] == 0.5


def test_a_changed_config_rebuilds(cfg, tmp_path):
    first, _ = prealigned_model(cfg, str(tmp_path / "base"), FakeStages())
    cfg.model.prealign.stages.sft.steps = 7
    stages = FakeStages()
    second, _ = prealigned_model(cfg, str(tmp_path / "base"), stages)
    assert second != first and stages.calls == ["pretrain", "sft", "dpo"]
    cfg.dataset.seed = 5
    third, _ = prealigned_model(cfg, str(tmp_path / "base"), FakeStages())
    assert third not in (first, second)


def test_user_training_settings_do_not_change_m_old(cfg, tmp_path):
    first, _ = prealigned_model(cfg, str(tmp_path / "base"), FakeStages())
    cfg.trainer.max_steps, cfg.optimizer.lr, cfg.loss.beta = 3, 0.5, 0.9
    cfg.select.enabled = not cfg.select.enabled
    cfg.oracle.noise = 0.2
    cfg.data.label_noise, cfg.data.size = 0.2, 10  # realignment's data plan
    stages = FakeStages()
    second, _ = prealigned_model(cfg, str(tmp_path / "base"), stages)
    assert second == first and stages.calls == []


def test_an_interrupted_build_leaves_no_cache(cfg, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        prealigned_model(cfg, str(tmp_path / "base"), FakeStages(fail_at="dpo"))
    cache = Path(cfg.paths.cache_dir)
    assert not list(cache.glob("m-old-*")) and not list(cache.glob(".m-old-*"))
    stages = FakeStages()
    prealigned_model(cfg, str(tmp_path / "base"), stages)
    assert stages.calls == ["pretrain", "sft", "dpo"]
