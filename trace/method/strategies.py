"""Distributed strategies, and which runs they can carry.

`trainer=ddp`: every rank holds the whole model (Lightning's DDPStrategy).
`trainer=fsdp`: FSDP2, torch's fully_shard on each decoder layer and on the policy (Lightning's
ModelParallelStrategy, data parallel over every rank). Parameters, gradients and optimizer state are
sharded; the module's hooks gather what impact scores, selection and saving need. Runs on GPUs over NCCL
and on CPU processes over gloo.
`trainer=fsdp1`: Lightning's FSDPStrategy (FullyShardedDataParallel wrappers). It trains, but its
wrapped root cannot be called outside the training step, so impact scores and selection are refused
under it at start-up (check_distributed).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Sequence

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _import(dotted: str) -> type | None:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        log.warning("fsdp: layer class %s not importable here; skipped", dotted)
        return None


def import_layer_classes(dotted: Sequence[str]) -> set[type]:
    classes = {c for c in (_import(d) for d in dotted) if c is not None}
    if not classes:
        raise ValueError(f"trainer.strategy.layer_classes: none of {list(dotted)} could be imported")
    return classes


def trainable_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The model's trainable parameters and its buffers, gathered whole on rank 0 (on the CPU), under their
    unwrapped names. A checkpoint holds the module's trainable state only (TraceModule.on_save_checkpoint):
    gathering the frozen base too would move a whole model to rank 0 at every checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


class FSDPTrainableCheckpoints(FSDPStrategy):
    """Lightning's FSDPStrategy whose checkpoints gather the trainable state only (full state dicts; sharded
    ones are Lightning's)."""

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        return trainable_state_dict(self.model)


def fsdp(layer_classes: Sequence[str], sharding_strategy: str = "FULL_SHARD", **kwargs: Any):
    """FSDP1: Lightning's FSDPStrategy wrapping each decoder layer; use_orig_params so LoRA's frozen and
    trainable parameters can share a flat parameter."""
    classes = import_layer_classes(layer_classes)
    return FSDPTrainableCheckpoints(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if kwargs.pop("activation_checkpointing", False) else None,
        sharding_strategy=sharding_strategy,
        use_orig_params=True,
        **kwargs,
    )


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 over every rank (data parallel only: no tensor parallelism). `parallelize` shards a model:
    each decoder layer is its own unit (gathered for its forward, freed after), the rest of the model the
    root unit; `generate` counts as a forward, so generation gathers what it needs too."""

    def __init__(self, layer_classes: Sequence[str], reshard_after_forward: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)
        self.layer_class_names = list(layer_classes)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # data parallel over all ranks (the parent's "auto" would make the ranks of a node tensor parallel)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return trainable_state_dict(self.model)

    def parallelize(self, model: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        classes = tuple(import_layer_classes(self.layer_class_names))
        mesh = self.device_mesh["data_parallel"]
        layers = [m for m in model.modules() if isinstance(m, classes)]
        if not layers:
            raise ValueError(f"trainer.strategy.layer_classes: the model {type(model).__name__} has no layer of "
                             f"{self.layer_class_names}; add its decoder layer class")
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        register_fsdp_forward_method(model, "generate")


def fsdp2(layer_classes: Sequence[str], **kwargs: Any) -> ShardedDataParallel:
    return ShardedDataParallel(layer_classes, **kwargs)


# FSDP1 and activation checkpointing wrap modules in place: the parameters' names gain these segments,
# which state dicts (and the unwrapped model) do not have
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name in the model before any wrapper was put around its modules."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def is_sharded(strategy: Any) -> bool:
    """Whether each rank holds only a shard of the parameters (FSDP1 or FSDP2)."""
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))


def check_distributed(cfg: DictConfig) -> None:
    """Refuse, before any oracle call or model load, a trainer that cannot carry this run, naming the fix."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, (dict, DictConfig)) else str(strategy)
    fsdp1 = target.endswith("strategies.fsdp") or "FSDPStrategy" in target or target == "fsdp"
    fsdp2_ = target.endswith("strategies.fsdp2") or "ModelParallel" in target
    if not (fsdp1 or fsdp2_):
        return
    name = "trainer=fsdp1 (FSDP1)" if fsdp1 else "trainer=fsdp (FSDP2)"
    problems = []
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if fsdp1 and (accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())):
        problems.append("FSDP1 needs GPUs (torch's FullyShardedDataParallel does not run on CPU processes): "
                        "use trainer=fsdp (FSDP2), which runs on CPU over gloo")
    lora = (cfg.model.get("lora") or {}).get("enabled", True)
    if not lora:
        problems.append("full fine-tuning keeps a whole frozen copy of the model as the reference on every rank: "
                        "set model.lora.enabled=true (the reference is then the policy with its adapters off) "
                        "or use trainer=ddp")
    impact = cfg.method.get("weights") == "impact" and not cfg.method.get("retrain")
    if impact and fsdp1:
        problems.append("impact scores call the policy outside the training step, which FSDP1's wrapped root "
                        "does not allow: use trainer=fsdp (FSDP2), or ablation=no_impact")
    if impact and fsdp2_ and str(cfg.impact.get("method", "batched")) == "loop":
        problems.append("impact.method=loop needs each sample's whole gradient, which FSDP shards over ranks: "
                        "use impact.method=batched (exact, and computed from each layer's inputs and output "
                        "gradients)")
    if (cfg.get("select") or {}).get("enabled") and fsdp1 and not cfg.method.get("retrain"):
        problems.append("choosing when to stop generates with the policy outside the training step, which "
                        "FSDP1 does not allow: use trainer=fsdp (FSDP2), or select.enabled=false")
    if (cfg.get("select") or {}).get("enabled") and (cfg.get("select") or {}).get("eval_last"):
        problems.append("select.eval_last evaluates the last step's parameters on rank 0 alone, which a sharded "
                        "policy cannot give: use trainer=ddp or one process, or select.eval_last=false")
    if (cfg.get("probe") or {}).get("enabled"):
        problems.append("the likelihood probe reads the policy on rank 0 alone, which a sharded policy cannot "
                        "answer: use trainer=ddp or one process, or probe.enabled=false")
    if problems:
        raise ValueError(f"{name} cannot carry this run:\n  - " + "\n  - ".join(problems))
