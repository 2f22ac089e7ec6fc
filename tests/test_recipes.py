"""The full-scale model configs carry the reference implementation's recipe, and the tiny model its own."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from hydra.utils import instantiate

HUB_MODELS = ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "smollm2-135m"]


@pytest.mark.parametrize("model", HUB_MODELS)
def test_a_hub_models_run_resolves_to_the_reference_recipe(model, tmp_path):
    cfg = compose_cfg([f"model={model}"], tmp_path)
    assert (cfg.optimizer.lr, cfg.loss.beta, cfg.objective.alpha_kl) == (1e-4, 0.3, 0.1)
    assert cfg.impact.gold_batch_size == 100
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 128)
    assert cfg.model.lora.enabled and cfg.model.prealign is None
    assert list(cfg.model.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]
    assert cfg.scheduler.warmup_ratio == 0.1 and cfg.scheduler.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("model", HUB_MODELS)
def test_the_recipes_schedule_warms_up_then_decays_to_zero(model, tmp_path):
    cfg = compose_cfg([f"model={model}", "trainer.max_steps=20"], tmp_path)
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.scheduler)(optimizer=optimizer)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5e-4)  # 10% of 20 steps: 2 steps of warmup
    assert max(lrs) == pytest.approx(1e-4) and lrs.index(max(lrs)) == 2
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01e-4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # 0 at trainer.max_steps


def test_the_tiny_model_keeps_its_own_recipe(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert (cfg.optimizer.lr, cfg.loss.beta, cfg.objective.alpha_kl) == (1e-3, 0.1, 0.1)
    assert cfg.impact.gold_batch_size == 48 and (cfg.data.max_length, cfg.data.max_prompt_length) == (128, 64)
    assert cfg.scheduler is None


def test_a_recipe_setting_is_overridden_from_the_command_line(tmp_path):
    cfg = compose_cfg(["model=llama-3.1-8b", "impact.gold_batch_size=7", "data.max_length=64", "scheduler=null",
                       "model.recipe.max_prompt_length=32"], tmp_path)
    assert (cfg.impact.gold_batch_size, cfg.data.max_length, cfg.data.max_prompt_length) == (7, 64, 32)
    assert cfg.scheduler is None
    warm = compose_cfg(["model=llama-3.1-8b", "model.recipe.scheduler.warmup_ratio=0.25"], tmp_path)
    assert warm.scheduler.warmup_ratio == 0.25


def test_a_cosine_schedule_without_an_end_is_refused():
    from trace_realign.method.schedules import cosine_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        cosine_with_warmup(optimizer, max_steps=-1)


def test_a_warmup_in_steps_is_counted_as_transformers_counts_it():
    from trace_realign.method.schedules import cosine_with_warmup

    def rates(**kw):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = cosine_with_warmup(optimizer, **kw)
        out = []
        for _ in range(kw["max_steps"]):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            sched.step()
        return out

    assert rates(max_steps=10, warmup_steps=4)[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # the reference's 100 warmup steps in a run of 35: the rate climbs the whole run and never peaks
    short = rates(max_steps=35, warmup_steps=100)
    assert short == sorted(short) and short[-1] == pytest.approx(0.34)
    with pytest.raises(ValueError, match="warmup_steps"):
        rates(max_steps=10, warmup_steps=-1)


def test_the_recipe_group_sets_the_reference_budgets_over_the_models_own(tmp_path):
    ref = compose_cfg(["recipe=reference"], tmp_path)
    assert (ref.optimizer.lr, ref.loss.beta, ref.objective.alpha_kl, ref.impact.gold_batch_size, ref.data.epochs) == \
        (1e-4, 0.3, 0.1, 100, 1)
    assert list(ref.model.lora.target_modules) == ["q_proj", "v_proj"] and ref.model.lora.alpha == 16
    assert ref.data.max_length == compose_cfg([], tmp_path).data.max_length  # what the recipe does not name stays
    dpo = compose_cfg(["recipe=reference_dpo", "method=dpo"], tmp_path)
    assert (dpo.optimizer.lr, dpo.loss.beta, dpo.data.epochs, dpo.model.lora.r) == (5e-5, 0.1, 1, 16)
    assert compose_cfg([], tmp_path).data.epochs is None  # the default trains trainer.max_steps
