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
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from trace_realign.core.records import INVERT, PUNISH, RETAIN
from trace_realign.core.sequences import sequence_logps
from trace_realign.method.datamodule import collate
from trace_realign.method.impact import (
    METHODS,
    ImpactBatch,
    batched_impact_scores,
    clip_and_normalise,
    gold_batch,
    gold_gradient,
    gold_slices,
    impact_scores,
    plan_batches,
    uniform_weights,
)
from trace_realign.method.losses import relational_loss
from trace_realign.method.objective import (
    ObjectiveConfig,
    ReferenceCache,
    category_losses,
    forward_logits,
    policy_and_reference_logps,
    reduce,
    step_terms,
)
from trace_realign.method.resume import rng_states, set_rng_states
from trace_realign.method.strategies import is_sharded, trainable_state_dict, unwrapped_name
from trace_realign.models.loading import (
    load_policy,
    load_trainable,
    policy_is_reference,
    trainable_parameters,
    whole_tensor,
)

log = logging.getLogger(__name__)


def row_tokens(row: Mapping[str, Any] | None) -> int:
    """The longest sequence of an encoded row (its padded width in a batch); 0 for an unserved sample."""
    return max((len(row[slot][0]) for slot in ("first", "second") if slot in row), default=0) if row else 0


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
        impact_method: str = "batched",
        impact_batch_size: int = 8,
    ):
        super().__init__()
        self.model_path, self.model_cfg, self.objective = model_path, dict(model_cfg), objective
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.use_impact, self.gamma, self.gold_batch_size = use_impact, gamma, gold_batch_size
        self.gold_chunk_size, self.stop_grad_norm, self.seed = gold_chunk_size, stop_grad_norm, seed
        self.top_k = top_k
        if impact_method not in METHODS:
            raise ValueError(f"impact.method: {impact_method!r}; expected one of {list(METHODS)}")
        if impact_batch_size < 1:
            raise ValueError(f"impact.batch_size must be >= 1, got {impact_batch_size}")
        self.impact_method, self.impact_batch_size = impact_method, impact_batch_size
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        # w over the weighted categories (the conflict set: invert, then punish); a buffer so a checkpoint carries it.
        self.register_buffer("weights", torch.zeros(0), persistent=True)
        self.impact_info: dict[str, float] = {}
        self.impact_raw = torch.zeros(0, dtype=torch.float64)  # <g_J, g_k> before clipping, for inspection
        self.stop_reason = "max_steps"
        self.last_losses: dict[str, float] = {}
        self.first_losses: dict[str, float] = {}
        # this step's train/* values for the loggers, with the step they belong to (written in on_train_batch_end)
        self.step_log: tuple[int, dict[str, Any]] | None = None
        self.reference_cache = ReferenceCache()
        self.impact_seconds = 0.0
        # Under a sharded strategy: the trainable parameters to evaluate and save, whole, on rank 0 (on_train_end).
        self.final_state: dict[str, torch.Tensor] | None = None
        self._parallelized = False
        # Resuming: the step the checkpoint was written at, and the generators' states to restore once
        # the training loop has started (Lightning draws a DataLoader seed from torch's before that).
        self.resumed, self.resumed_from_step = False, 0
        self._rng_to_restore: dict[str, Any] | None = None
        # A checkpoint holds the trainable parameters only (checkpoint_keys); on_load_checkpoint checks it.
        self.strict_loading = False

    # -- model --
    def configure_model(self) -> None:
        """Load the policy (the apps call this before fitting, to evaluate M_old), then, once the trainer's
        processes exist, let a sharding strategy shard it (FSDP2: trainer=fsdp)."""
        if self.policy is None:
            self.policy, self.reference = load_policy(self.model_path, self.model_cfg)
            self.policy.train()  # from_pretrained returns eval mode; dropout is already off either way
        strategy = self._trainer.strategy if self._trainer is not None else None
        if hasattr(strategy, "parallelize") and not self._parallelized:
            strategy.parallelize(self.policy)
            self._parallelized = True

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only a shard of the parameters."""
        return self._trainer is not None and is_sharded(self._trainer.strategy)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, whole and on CPU, named as in the unsharded policy. Under a sharded
        strategy this gathers the shards: every rank must call it, and rank 0 receives the tensors."""
        assert self.policy is not None
        if not self.sharded:
            return {unwrapped_name(n): p.detach().cpu().clone() for n, p in self.policy.named_parameters() if p.requires_grad}
        if isinstance(self.trainer.strategy, ModelParallelStrategy):  # FSDP2: the policy is its own root
            state = trainable_state_dict(self.policy)
        else:  # FSDP1: the root wraps this module; its names end in those of the policy's
            state = {k.split("policy.", 1)[1]: v for k, v in
                     trainable_state_dict(self.trainer.strategy.model).items() if "policy." in k}
        names = {unwrapped_name(n) for n, p in self.policy.named_parameters() if p.requires_grad}
        return {n: v for n, v in state.items() if n in names}  # (tied frozen weights come along otherwise)

    def on_train_end(self) -> None:
        # Gather while the ranks still run together; the apps evaluate and save on rank 0 after fitting.
        # (An oracle-chosen step's parameters, if any, were set by SelectByOracle just before.)
        if not self.sharded:
            return
        chosen = self.trainer.strategy.broadcast(self.final_state is not None)
        if not chosen:
            self.final_state = self.trainable_state()

    def final_policy(self) -> torch.nn.Module:
        """The trained policy, whole, on this rank's device (rank 0): the module's own, or under a sharded
        strategy a fresh copy of M_old with the gathered trainable parameters."""
        assert self.policy is not None
        if not self.sharded:
            return self.policy
        if self.final_state is None:
            raise RuntimeError("the trained parameters were not gathered (on_train_end did not run on rank 0)")
        policy, _ = load_policy(self.model_path, self.model_cfg)
        load_trainable(policy, self.final_state)
        return policy.to(self.device).eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # The weights buffer is sized by the data: take its shape from the checkpoint.
        if "weights" in state_dict:
            self.weights = torch.empty_like(state_dict["weights"])
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- checkpoints (resume.py): the trainable state only, never the frozen base or reference --
    def checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint holds: the trainable parameters (LoRA adapters, or the whole policy
        under full fine-tuning) and the module's own buffers (the impact weights)."""
        trainable = {unwrapped_name(n) for n, p in self.named_parameters() if p.requires_grad}
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
            # each rank's own: the reference log-probs it served and its generators (rank 0 writes them all)
            "ranks": self._per_rank({"reference_cache": {"rows": dict(self.reference_cache.rows),
                                                         "hits": self.reference_cache.hits,
                                                         "misses": self.reference_cache.misses},
                                     "rng": rng_states()}),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        where = (self._trainer.ckpt_path if self._trainer is not None else None) or "the checkpoint"
        if "state_dict" in checkpoint:
            saved = checkpoint["state_dict"]
        else:  # a sharded strategy has loaded the parameters itself, and passes the rest: read the file's keys
            saved = torch.load(where, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
        have, want = set(saved), self.checkpoint_keys()
        n = self.trainer.datamodule.num_conflicts if self._trainer is not None and self.trainer.datamodule else None
        if n is not None and "weights" in saved and saved["weights"].numel() != n:
            raise ValueError(f"{where} holds {saved['weights'].numel()} impact weights, this run's data has {n} "
                             "weighted pairs: delete the checkpoint to start afresh")
        if have != want or "trace" not in checkpoint:
            extra, lacking = sorted(have - want), sorted(want - have)
            raise ValueError(f"{where} does not hold this run's trainable state ({len(extra)} unexpected keys, e.g. "
                             f"{extra[:3]}; {len(lacking)} missing, e.g. {lacking[:3]}): delete it to start afresh")
        state = checkpoint["trace"]
        self.impact_info, self.impact_raw = dict(state["impact_info"]), state["impact_raw"]
        self.impact_seconds, self.stop_reason = float(state["impact_seconds"]), state["stop_reason"]
        self.first_losses, self.last_losses = dict(state["first_losses"]), dict(state["last_losses"])
        world, rank = (self.trainer.world_size, self.global_rank) if self._trainer is not None else (1, 0)
        if len(state["ranks"]) != world:
            raise ValueError(f"{where} was written by a run of {len(state['ranks'])} processes, this one has {world} "
                             "(each draws its own batches): resume with as many, or delete it to start afresh")
        mine = state["ranks"][rank]
        cache = mine["reference_cache"]
        self.reference_cache.rows = dict(cache["rows"])
        self.reference_cache.hits, self.reference_cache.misses = int(cache["hits"]), int(cache["misses"])
        self._rng_to_restore = mine["rng"]
        self.resumed, self.resumed_from_step = True, int(checkpoint["global_step"])
        log.info("resuming from %s at step %d", where, self.resumed_from_step)

    def _per_rank(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's `state`, in rank order (a collective: every rank dumps a checkpoint)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [state]
        states: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return states

    def _all_ranks(self, flag: bool) -> bool:
        """Whether `flag` holds on every rank (a collective)."""
        t = torch.tensor(int(flag), device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t)

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # -- stage 2: impact weights at theta_ref --
    def on_fit_start(self) -> None:
        if self.resumed:
            # the weights were computed at theta_ref and came with the checkpoint (sized to this data: checked
            # on loading)
            self.weights = self.weights.to(self.device)
            return
        if self.trainer.ckpt_path and self.trainer.strategy.restore_checkpoint_after_setup:
            # A sharded strategy restores the checkpoint after this hook: the weights come with it, into a
            # buffer of this data's size; theta_ref's scores are not recomputed.
            self.weights = torch.zeros(self.trainer.datamodule.num_conflicts, device=self.device)
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
        if self.sharded:
            slices = sharded_gold_gradient(self.policy, params, [gold_chunk(c) for c in chunks])
            g_gold = torch.cat([slices[p].reshape(-1) for p in params])
        else:
            g_gold = gold_gradient(params, [gold_chunk(c) for c in chunks])
            slices = gold_slices(params, g_gold)

        # At theta_ref the policy usually computes pi_ref itself (LoRA's B factors are still zero): its log-probs,
        # detached, are pi_ref's bit for bit, and the batched method skips the reference's forward pass. The loop,
        # the reference implementation, always runs it.
        tied = self.impact_method == "batched" and policy_is_reference(self.policy, self.reference)

        def samples(ks: list[int]):
            # the summed loss of samples of one category, stacked as one batch (rows as in objective.py)
            def make() -> torch.Tensor:
                category = dm.conflict_row(ks[0])[0]
                batch = self._to_device(collate([dm.conflict_row(k)[1] for k in ks], dm.tokenizer.pad_token_id))
                if tied:
                    pol = sequence_logps(forward_logits(self.policy, batch), batch["labels"])
                    ref = pol.detach()
                else:
                    pol, ref = policy_and_reference_logps(self.policy, self.reference, batch)
                return category_losses(category, pol, ref, cfg).sum()
            return make

        rank, world = self.global_rank, self.trainer.world_size
        progress = self.trainer.is_global_zero
        if self.impact_method == "loop":
            losses = [samples([k]) if k % world == rank and served[k] else None for k in range(dm.num_conflicts)]
            scores = impact_scores(params, g_gold, losses, progress=progress)
        else:
            categories = [dm.conflict_row(k)[0] if served[k] else None for k in range(dm.num_conflicts)]
            lengths = [row_tokens(dm.conflict_row(k)[1]) for k in range(dm.num_conflicts)]
            plan = plan_batches(categories, rank, world, self.impact_batch_size, lengths)
            batches = [ImpactBatch(ks, samples(ks), counted) for ks, counted in plan]
            scores = batched_impact_scores(self.policy, slices, batches, dm.num_conflicts, progress=progress,
                                           sharded=self.sharded)
        if world > 1:
            scores = self.trainer.strategy.reduce(scores.to(self.device), reduce_op="sum").cpu()
        self.impact_raw = scores
        w, info = clip_and_normalise(scores, self.gamma, torch.tensor(served), self.top_k)
        info.update({"impact/reference_shared": int(tied), "impact/gold_retain": gold.n_retain, "impact/gold_invert": gold.n_invert,
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
        # under FSDP every rank runs the reference's forward or none does (its layers gather in step)
        agree = self._all_ranks if self.sharded and self.trainer.world_size > 1 else None
        logps: dict[str, torch.Tensor] = {}
        per_category = step_terms(self.policy, self.reference, batch, cfg, self.reference_cache, agree, logps)
        for category, per_sample in per_category.items():
            if cfg.terms[category] == "kl":
                terms["kl"] = reduce(per_sample, cfg.reduction)
                continue
            if category in cfg.weighted:  # the conflict set (or the method's weighted set) carries the weights
                per_sample = self.weights[batch[category]["index"]] * scale * per_sample
            terms[category] = reduce(per_sample, cfg.reduction)
        loss = terms[INVERT] + terms[PUNISH] + terms[RETAIN] + cfg.alpha_kl * terms["kl"]
        values = {"train/loss": loss, "train/loss_invert": terms[INVERT], "train/loss_punish": terms[PUNISH],
                  "train/loss_retain": terms[RETAIN], "train/loss_kl": terms["kl"],
                  # where each response's likelihood goes (the log only: not among the losses metrics.json keeps)
                  **{f"train/logps/{k}": v for k, v in logps.items()}}
        self.log("loss", loss, prog_bar=True, logger=False)
        # one device-to-host copy, not one per value (each would wait for the GPU)
        logged = dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist()))
        self.last_losses = {k: v for k, v in logged.items() if not k.startswith("train/logps/")}
        if not self.first_losses:
            self.first_losses = {k.replace("train/", "train/first_"): v for k, v in self.last_losses.items()}
        # The loggers get these as floats, once per step, in on_train_batch_end: Lightning's self.log
        # costs about 0.2 ms per value and step (its result collection), 2-3 % of a step of the embedded default.
        self.step_log = (self.global_step, logged)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Writes the step's train/* values (and the gradient norm) as Lightning's on_step logging would:
        at the step of the training_step that made them, every trainer.log_every_n_steps steps, and when
        training stops; each logger writes on global rank 0 only."""
        if self.step_log is None:
            return
        step, logged = self.step_log
        self.step_log = None
        trainer = self.trainer
        if (step + 1) % max(trainer.log_every_n_steps, 1) and not trainer.should_stop:
            return
        metrics = {k: float(v) for k, v in logged.items()}
        for logger in self.loggers:
            logger.log_metrics({**metrics, "epoch": self.current_epoch}, step=step)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # FSDP1's flat parameters are clipped by the wrapper's own clip_grad_norm_ (Lightning refuses norm
        # clipping under FSDPPrecision); it reduces the norm over every rank's shard
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm in (None, "norm"):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Line 22: stop once ||grad L_TRACE|| <= epsilon."""
        # (a sharded gradient is a DTensor: its norm is reduced over ranks, so every rank decides alike)
        grads = [whole_tensor(p.grad.detach().float().norm()) for p in trainable_parameters(self.policy) if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)
        if self.step_log is not None:  # a float when it is written (on an accelerator: no wait unless logged)
            self.step_log[1]["train/grad_norm"] = norm.detach()
        if self.stop_grad_norm > 0 and float(norm) <= self.stop_grad_norm:
            self.stop_reason = "grad_norm"
            self.trainer.should_stop = True

    def configure_optimizers(self):
        assert self.policy is not None
        optimizer = self.optimizer_factory(params=trainable_parameters(self.policy))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "step"}}


def sharded_gold_gradient(model: torch.nn.Module, params: list[torch.Tensor],
                          chunk_losses: list[Callable[[], torch.Tensor]]) -> dict[torch.Tensor, torch.Tensor]:
    """g_J under FSDP, whole on every rank, one tensor per (sharded) parameter. Every rank backpropagates
    the whole gold batch, so the gradients FSDP averages over ranks are g_J itself; each is then gathered."""
    model.zero_grad(set_to_none=True)
    for make_loss in chunk_losses:
        make_loss().backward()
    out = {p: (whole_tensor(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)).detach().clone()
           for p in params}
    model.zero_grad(set_to_none=True)
    return out
