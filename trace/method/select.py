"""Choosing when to stop by the oracle: keep the parameters whose generations comply best.

Relational losses keep pushing margins after the behaviour has flipped, and past some point the
generations on conflict prompts degenerate; where that point lies moves with the seed, so neither a fixed
T_max nor the gradient-norm threshold can see it. This callback generates on a fixed sample of the
training prompts every few steps, has the oracle judge them against pi_new (TRACE already pays for the
oracle), and restores the best-scoring trainable parameters at the end. Held-out evaluation prompts are
never used, so the selection does not see the test set.

With several processes, rank 0 alone asks the oracle (a call is paid once). Under DDP it generates alone
with its whole policy; under a sharded strategy (FSDP2) every rank generates the same prompts in step, each
gathering the layers it runs, and the best parameters are gathered whole to rank 0.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import lightning as L
import torch

from trace_realign.eval import generate
from trace_realign.method.strategies import is_sharded
from trace_realign.models.loading import load_trainable
from trace_realign.oracle.base import Oracle, Policy

log = logging.getLogger(__name__)


class SelectByOracle(L.Callback):
    def __init__(
        self,
        prompts: Sequence[str],
        oracle: Oracle,
        policy: Policy,
        tokenizer: Any,
        every_n_steps: int = 25,
        max_new_tokens: int = 32,
        batch_size: int = 32,
        keep_last: bool = False,
    ):
        if every_n_steps < 1:
            raise ValueError(f"select.every_n_steps must be >= 1, got {every_n_steps}")
        self.prompts, self.oracle, self.policy, self.tokenizer = list(prompts), oracle, policy, tokenizer
        self.every, self.max_new_tokens, self.batch_size = every_n_steps, max_new_tokens, batch_size
        self.history: list[tuple[int, float]] = []
        self.best_score, self.best_step = float("-inf"), -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_checked = -1
        self.seconds = 0.0
        # keep_last: the last step's parameters are kept too (last_state, None when the last step is the one
        # kept), so the run can also say what T_max alone scores (select.eval_last)
        self.keep_last = keep_last
        self.last_state: dict[str, torch.Tensor] | None = None

    def score(self, model: torch.nn.Module, judge: bool = True, synced: bool = False) -> float:
        """The oracle's compliance rate (%) of the model's generations; `judge=False` generates only (a rank
        other than 0 under a sharded strategy, keeping step with rank 0's generation)."""
        responses = generate(model, self.tokenizer, self.prompts, self.max_new_tokens, self.batch_size,
                             progress=False, synced=synced)
        if not judge:
            return float("nan")
        verdicts = self.oracle.judge_batch(list(zip(self.prompts, responses)), self.policy)
        if verdicts and all(v is None for v in verdicts):
            # Every candidate would score 0 and theta_ref would be kept without a word: refuse instead.
            raise ValueError(
                f"select: the oracle could not judge any of {len(verdicts)} generations. An oracle that knows only "
                "annotated responses (oracle=labels) cannot choose when to stop: add a judge that reads text "
                "(oracle@judge=openai) or set select.enabled=false")
        decided = [v for v in verdicts if v is not None]  # a failed call is no verdict either way
        return 100.0 * sum(decided) / max(len(decided), 1)

    def _consider(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sharded = is_sharded(trainer.strategy)
        if not (trainer.is_global_zero or sharded):
            return  # DDP: rank 0 judges its own whole policy alone
        step, start = trainer.global_step, time.time()
        self.last_checked = step
        score = self.score(module.policy, judge=trainer.is_global_zero, synced=sharded and trainer.world_size > 1)
        self.seconds += time.time() - start
        better = trainer.is_global_zero and score > self.best_score  # ties keep the earlier, less trained parameters
        if trainer.is_global_zero:
            self.history.append((step, score))
            for logger in trainer.loggers:  # the selection curve beside the losses (trace-tables --plots)
                logger.log_metrics({"select/tpa": score}, step=step)
        if sharded:
            better = trainer.strategy.broadcast(better)  # every rank takes part in gathering the shards
        if better:
            state = module.trainable_state()
            if trainer.is_global_zero:
                self.best_score, self.best_step, self.best_state = score, step, state

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.history:  # (a resumed run has judged theta_ref already: its history came with the checkpoint)
            self._consider(trainer, module)  # step 0: theta_ref itself is a candidate

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._consider(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.last_checked != trainer.global_step:  # the same on every rank, so collectives stay paired
            self._consider(trainer, module)
        if not trainer.is_global_zero:
            return
        if self.keep_last and self.best_step != trainer.global_step and not is_sharded(trainer.strategy):
            self.last_state = module.trainable_state()
        if self.best_state is not None:
            if is_sharded(trainer.strategy):
                module.final_state = self.best_state  # the module's whole copy for evaluation and saving
            else:
                load_trainable(module.policy, self.best_state)
        log.info("select: kept step %d (selection TPA %.1f) of %s", self.best_step, self.best_score, self.history)

    # -- in a checkpoint (resume.py): what was judged so far and the best parameters --
    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "best_score": self.best_score, "best_step": self.best_step,
                "best_state": self.best_state, "seconds": self.seconds, "every": self.every,
                "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["every"], state["prompts"]) != (self.every, len(self.prompts)):
            raise ValueError(f"the checkpoint's selection checked every {state['every']} steps on {state['prompts']} "
                             f"prompts, this run every {self.every} on {len(self.prompts)}: it is another run's state; "
                             "delete the checkpoint to start afresh")
        self.history = [(int(step), float(score)) for step, score in state["history"]]
        self.best_score, self.best_step = float(state["best_score"]), int(state["best_step"])
        self.best_state, self.seconds = state["best_state"], float(state["seconds"])

    def metrics(self) -> dict[str, float]:
        return {"select/best_step": float(self.best_step), "select/best_tpa": self.best_score,
                "select/checks": float(len(self.history))}
