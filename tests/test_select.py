"""Choosing when to stop by the oracle: the best-judged parameters are the ones kept."""

from __future__ import annotations

import pytest
import torch

from trace_realign.method.select import SelectByOracle
from trace_realign.oracle.base import Oracle, Policy


class Trainer:
    global_step = 0
    loggers: list = []
    strategy = None  # one process: neither DDP nor FSDP
    is_global_zero = True
    world_size = 1


class Module:
    def __init__(self):
        self.policy = torch.nn.Linear(2, 1)
        self.policy.bias.requires_grad_(False)  # frozen parameters are neither saved nor restored

    def trainable_state(self):
        return {n: p.detach().clone() for n, p in self.policy.named_parameters() if p.requires_grad}


class ScoreByWeight(SelectByOracle):
    """Scores the model by a made-up schedule instead of generating: peak at step 20."""

    def __init__(self, schedule):
        super().__init__(["p"], Oracle(), Policy("p", ""), tokenizer=None, every_n_steps=10)
        self.schedule = schedule
        self.trainer = None

    def score(self, model, judge=True, synced=False):
        return self.schedule[self.trainer.global_step]


def train(cb, trainer, module, steps):
    """Steps 1..steps, each moving the trainable weight by 1, with the callback's hooks around them."""
    cb.on_train_start(trainer, module)
    for step in range(1, steps + 1):
        trainer.global_step = step
        with torch.no_grad():
            module.policy.weight.add_(1.0)
        cb.on_train_batch_end(trainer, module)


def test_best_parameters_are_restored_and_ties_keep_the_earlier():
    trainer, module = Trainer(), Module()
    cb = ScoreByWeight({0: 10.0, 10: 50.0, 20: 80.0, 30: 80.0, 40: 5.0})
    cb.trainer = trainer
    snapshots = {}
    cb.on_train_start(trainer, module)
    for step in range(1, 41):
        trainer.global_step = step
        with torch.no_grad():
            module.policy.weight.add_(1.0)  # training moves the weights every step
            module.policy.bias.add_(1.0)  # and the frozen bias too, so that restoring it would show
        snapshots[step] = module.policy.weight.detach().clone()
        cb.on_train_batch_end(trainer, module)
    bias = module.policy.bias.detach().clone()
    cb.on_train_end(trainer, module)
    assert cb.best_step == 20 and cb.best_score == 80.0
    assert torch.equal(module.policy.weight, snapshots[20])
    assert not torch.equal(snapshots[20], snapshots[30])  # the tie at step 30 holds other weights
    assert set(cb.best_state) == {"weight"}
    assert torch.equal(module.policy.bias, bias)  # not saved, not restored: as training left it
    assert [s for s, _ in cb.history] == [0, 10, 20, 30, 40]  # step 40 is not checked twice at the end
    assert cb.metrics() == {"select/best_step": 20.0, "select/best_tpa": 80.0, "select/checks": 5.0}


def test_a_last_step_between_checks_is_checked_at_the_end():
    trainer, module = Trainer(), Module()
    cb = ScoreByWeight({0: 10.0, 10: 20.0, 20: 30.0, 25: 90.0})
    cb.trainer = trainer
    train(cb, trainer, module, 25)
    last = module.policy.weight.detach().clone()
    cb.on_train_end(trainer, module)
    assert [s for s, _ in cb.history] == [0, 10, 20, 25]
    assert cb.best_step == 25 and torch.equal(module.policy.weight, last)


def test_theta_ref_is_kept_when_training_never_beats_it():
    trainer, module = Trainer(), Module()
    start = module.policy.weight.detach().clone()
    cb = ScoreByWeight({0: 60.0, 10: 40.0, 20: 60.0})
    cb.trainer = trainer
    logged = []

    class Recorder:
        def log_metrics(self, metrics, step):
            logged.append((step, metrics))

    trainer.loggers = [Recorder()]
    train(cb, trainer, module, 20)
    cb.on_train_end(trainer, module)
    assert cb.best_step == 0 and torch.equal(module.policy.weight, start)
    # every check is logged as the selection curve, at its step
    assert logged == [(0, {"select/tpa": 60.0}), (10, {"select/tpa": 40.0}), (20, {"select/tpa": 60.0})]


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        SelectByOracle(["p"], Oracle(), Policy("p", ""), tokenizer=None, every_n_steps=0)


class Table(Oracle):
    def __init__(self, verdicts):
        self.verdicts = verdicts

    def judge(self, prompt, response, policy):
        return self.verdicts[prompt]


def test_score_leaves_failed_verdicts_out_and_refuses_when_none_is_given(monkeypatch):
    import trace_realign.method.select as select

    monkeypatch.setattr(select, "generate", lambda model, tok, prompts, *a, **k: ["text"] * len(prompts))
    cb = SelectByOracle(["a", "b", "c", "d"], Table({"a": True, "b": None, "c": False, "d": True}), Policy("p", ""),
                        tokenizer=None)
    assert cb.score(None) == pytest.approx(200 / 3)  # 2 of the 3 judged comply; the failed call is no verdict
    cb = SelectByOracle(["a"], Table({"a": None}), Policy("p", ""), tokenizer=None)
    with pytest.raises(ValueError, match="could not judge any"):
        cb.score(None)
