"""The LightningModule: impact weights at theta_ref, then the hybrid TRACE objective.

    L_TRACE = sum_I w_i l_rel(x, y_l, y_w) + sum_P w_j l_NPO(x, y_w, y_l)  [or l_rel(x, y_c, y_w)]
              + alpha_KL sum_R KL(pi_ref || pi_theta)                       (Algorithm 1, lines 22-28)

Every method, baseline and ablation is this module under a different configuration.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Mapping

import lightning as L
import torch

from trace_realign.data import collate
from trace_realign.impact import clip_and_normalise, gold_batch, gold_gradient, impact_scores, uniform_weights
from trace_realign.model import load_policy, trainable_parameters
from trace_realign.objective import (
    ObjectiveConfig,
    ReferenceCache,
    category_losses,
    forward_logits,
    nll,
    sequence_losses,
    policy_and_reference_logps,
    reduce,
    retain_kl,
)
from trace_realign.losses import relational_loss
from trace_realign.records import INVERT, PUNISH, RETAIN
from trace_realign.resume import rng_states, set_rng_states
from trace_realign.sequences import sequence_logps

log = logging.getLogger(__name__)


class TraceModule(L.LightningModule):
    def __init__(
        self,
        model_path: str,
        model_cfg: Mapping[str, Any],
        objective: ObjectiveConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        use_impact: bool = True,
        gamma: float = 1.0,
        gold_batch_size: int = 48,
        gold_chunk_size: int = 8,
        stop_grad_norm: float = 0.0,
        seed: int = 0,
        top_k: int | None = None,
    ):
        super().__init__()
        self.model_path, self.model_cfg, self.objective = model_path, dict(model_cfg), objective
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.use_impact, self.gamma, self.gold_batch_size = use_impact, gamma, gold_batch_size
        self.gold_chunk_size, self.stop_grad_norm, self.seed = gold_chunk_size, stop_grad_norm, seed
        self.top_k = top_k
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        # w over the weighted categories (the conflict set: invert, then punish); a buffer so a checkpoint carries it.
        self.register_buffer("weights", torch.zeros(0), persistent=True)
        self.impact_info: dict[str, float] = {}
        self.impact_raw = torch.zeros(0, dtype=torch.float64)  # <g_J, g_k> before clipping, for inspection
        self.stop_reason = "max_steps"
        self.last_losses: dict[str, float] = {}
        self.first_losses: dict[str, float] = {}
        self.reference_cache = ReferenceCache()
        self.impact_seconds = 0.0
        # Resuming: the step the checkpoint was written at, and the generators' states to restore once
        # the training loop has started (Lightning draws a DataLoader seed from torch's before that).
        self.resumed, self.resumed_from_step = False, 0
        self._rng_to_restore: dict[str, Any] | None = None
        # A checkpoint holds the trainable parameters only (checkpoint_keys); on_load_checkpoint checks it.
        self.strict_loading = False

    # -- model --
    def configure_model(self) -> None:
        if self.policy is None:
            self.policy, self.reference = load_policy(self.model_path, self.model_cfg)
            self.policy.train()  # from_pretrained returns eval mode; dropout is already off either way

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The weights buffer is sized by the data: take its shape from the checkpoint.
        if "weights" in state_dict:
            self.weights = torch.empty_like(state_dict["weights"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- checkpoints (resume.py): the trainable state only, never the frozen base or reference --
    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint holds: the trainable parameters (LoRA adapters, or the whole policy
        under full fine-tuning) and the module's own buffers (the impact weights)."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        return trainable | {n for n, _ in self.named_buffers(recurse=False)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        # what metrics.json and data/impact.jsonl read, and the reference log-probs already served
        # (recomputed in another batch they could differ in the last bits)
        checkpoint["trace"] = {
            "impact_info": {k: float(v) for k, v in self.impact_info.items()},
            "impact_raw": self.impact_raw.clone(), "impact_seconds": self.impact_seconds,
            "first_losses": dict(self.first_losses), "last_losses": dict(self.last_losses),
            "stop_reason": self.stop_reason,
            "reference_cache": {"rows": dict(self.reference_cache.rows), "hits": self.reference_cache.hits,
                                "misses": self.reference_cache.misses},
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        where = (self._trainer.ckpt_path if self._trainer is not None else None) or "the checkpoint"
        have, want = set(checkpoint["state_dict"]), self.checkpoint_keys()
        if have != want or "trace" not in checkpoint:
            extra, lacking = sorted(have - want), sorted(want - have)
            raise ValueError(f"{where} does not hold this run's trainable state ({len(extra)} unexpected keys, e.g. "
                             f"{extra[:3]}; {len(lacking)} missing, e.g. {lacking[:3]}): delete it to start afresh")
        state = checkpoint["trace"]
        self.impact_info, self.impact_raw = dict(state["impact_info"]), state["impact_raw"]
        self.impact_seconds, self.stop_reason = float(state["impact_seconds"]), state["stop_reason"]
        self.first_losses, self.last_losses = dict(state["first_losses"]), dict(state["last_losses"])
        cache = state["reference_cache"]
        self.reference_cache.rows = dict(cache["rows"])
        self.reference_cache.hits, self.reference_cache.misses = int(cache["hits"]), int(cache["misses"])
        self._rng_to_restore = state["rng"]
        self.resumed, self.resumed_from_step = True, int(checkpoint["global_step"])
        log.info("resuming from %s at step %d", where, self.resumed_from_step)

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # -- stage 2: impact weights at theta_ref --
    def on_fit_start(self) -> None:
        if self.resumed:
            # the weights were computed at theta_ref and came with the checkpoint; they must fit this data
            n = self.trainer.datamodule.num_conflicts
            if self.weights.numel() != n:
                raise ValueError(f"{self.trainer.ckpt_path} holds {self.weights.numel()} impact weights, this run's "
                                 f"data has {n} weighted pairs: delete the checkpoint to start afresh")
            self.weights = self.weights.to(self.device)
            return
        start = time.time()
        dm = self.trainer.datamodule
        n = dm.num_conflicts
        if not self.use_impact or n == 0:
            w, info = uniform_weights(n, torch.tensor([dm.conflict_row(k)[1] is not None for k in range(n)]))
            self.impact_raw = torch.full((n,), float("nan"), dtype=torch.float64)
        else:
            w, info = self.compute_impact(dm)
        self.weights = w.to(self.device, torch.float32)
        self.impact_info = info
        self.impact_seconds = time.time() - start
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics({k: float(v) for k, v in info.items()}, step=0)

    @torch.enable_grad()
    def compute_impact(self, dm) -> tuple[torch.Tensor, dict[str, float]]:
        """Lines 9-20, sharded over ranks: each rank scores every world-th sample, then the scores are summed.
        Each weighted sample's gradient is that of its own term (U2A's NPO, TRACE's relational or NPO)."""
        assert self.policy is not None
        if type(self.trainer.strategy).__name__.startswith("FSDP"):
            # Per-sample gradients need whole gradients on each rank; FSDP shards them across ranks.
            raise NotImplementedError(
                "impact weights are not computed under FSDP yet: use trainer=ddp, or method=no_impact"
            )
        rng = random.Random(self.seed)
        gold = gold_batch(dm.splits[INVERT], dm.splits[PUNISH], dm.splits[RETAIN], self.gold_batch_size, rng)
        served = [dm.conflict_row(k)[1] is not None for k in range(dm.num_conflicts)]
        if not gold.triples:
            # Algorithm 2 finds no compliant response to build J from (e.g. every pair is punished):
            # the impact score is undefined, so every conflict weighs the same, and the run says so.
            log.warning("empty gold batch: impact weights fall back to uniform")
            w, info = uniform_weights(dm.num_conflicts, torch.tensor(served))
            self.impact_raw = torch.full((dm.num_conflicts,), float("nan"), dtype=torch.float64)
            return w, {**info, "impact/fallback_uniform": 1, "impact/gold_empty": 1}
        params = trainable_parameters(self.policy)
        cfg = self.objective

        def gold_chunk(triples):
            def make() -> torch.Tensor:
                batch = self._to_device(dm.encode_triples(triples))
                pol, ref = policy_and_reference_logps(self.policy, self.reference, batch)
                b = len(triples)
                return relational_loss(pol[:b], pol[b:], ref[:b], ref[b:], cfg.beta, cfg.relational).sum()
            return make

        chunks = [gold.triples[i : i + self.gold_chunk_size] for i in range(0, len(gold.triples), self.gold_chunk_size)]
        g_gold = gold_gradient(params, [gold_chunk(c) for c in chunks])

        def sample(k: int):
            def make() -> torch.Tensor:
                category, row = dm.conflict_row(k)
                batch = self._to_device(collate([row], dm.tokenizer.pad_token_id))
                pol, ref = policy_and_reference_logps(self.policy, self.reference, batch)
                return category_losses(category, pol, ref, cfg).sum()
            return make

        rank, world = self.global_rank, self.trainer.world_size
        losses = [sample(k) if k % world == rank and served[k] else None for k in range(dm.num_conflicts)]
        scores = impact_scores(params, g_gold, losses, progress=self.trainer.is_global_zero)
        if world > 1:
            scores = self.trainer.strategy.reduce(scores.to(self.device), reduce_op="sum").cpu()
        self.impact_raw = scores
        w, info = clip_and_normalise(scores, self.gamma, torch.tensor(served), self.top_k)
        info.update({"impact/gold_retain": gold.n_retain, "impact/gold_invert": gold.n_invert,
                     "impact/gold_punish": gold.n_punish, "impact/grad_norm_gold": float(g_gold.norm())})
        self.policy.zero_grad(set_to_none=True)
        return w, info

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- stage 3: the hybrid objective --
    def training_step(self, batch: dict[str, dict[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        assert self.policy is not None
        cfg = self.objective
        # Mean reduction uses mean-one weights, so uniform weights give plain batch means.
        scale = float(self.weights.numel()) if cfg.reduction == "mean" else 1.0
        zero = torch.zeros((), device=self.device)
        terms = {INVERT: zero, PUNISH: zero, RETAIN: zero, "kl": zero}
        for category, part in batch.items():
            term = cfg.terms[category]
            if term == "kl":
                with torch.set_grad_enabled(cfg.alpha_kl > 0):  # logged even when it does not train (no_kl)
                    terms["kl"] = reduce(retain_kl(self.policy, self.reference, part), cfg.reduction)
                continue
            if term == "nll":
                per_sample = nll(self.policy, part)
            else:
                ref = self.reference_cache(self.policy, self.reference, category, part)
                pol = sequence_logps(forward_logits(self.policy, part), part["labels"])
                per_sample = sequence_losses(term, pol, ref, cfg)
            if category in cfg.weighted:  # the conflict set (or the method's weighted set) carries the weights
                per_sample = self.weights[part["index"]] * scale * per_sample
            terms[category] = reduce(per_sample, cfg.reduction)
        loss = terms[INVERT] + terms[PUNISH] + terms[RETAIN] + cfg.alpha_kl * terms["kl"]
        values = {"train/loss": loss, "train/loss_invert": terms[INVERT], "train/loss_punish": terms[PUNISH],
                  "train/loss_retain": terms[RETAIN], "train/loss_kl": terms["kl"]}
        self.log_dict(values, prog_bar=False, on_step=True, on_epoch=False)
        self.log("loss", loss, prog_bar=True, logger=False)
        self.last_losses = {k: float(v.detach()) for k, v in values.items()}
        if not self.first_losses:
            self.first_losses = {k.replace("train/", "train/first_"): v for k, v in self.last_losses.items()}
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Line 22: stop once ||grad L_TRACE|| <= epsilon."""
        grads = [p.grad.detach().float().norm() for p in trainable_parameters(self.policy) if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if self.stop_grad_norm > 0 and float(norm) <= self.stop_grad_norm:
            self.stop_reason = "grad_norm"
            self.trainer.should_stop = True

    def configure_optimizers(self):
        assert self.policy is not None
        optimizer = self.optimizer_factory(params=trainable_parameters(self.policy))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "step"}}
