"""Generation for evaluation: batched, left-padded, through the chat template; greedy or sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from trace_realign.core.progress import bar_off
from trace_realign.core.sequences import encode_prompt, stop_token_ids


@dataclass(frozen=True)
class GenerationSettings:
    """How evaluators generate (eval.max_new_tokens, eval.batch_size, eval.sampling). Greedy always; `samples` > 0 adds that many sampled
    responses per prompt at `temperature` / `top_p`, drawn from a generator seeded by `seed` alone (the same
    seed and batch size give the same samples)."""

    max_new_tokens: int = 32
    batch_size: int = 32
    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"eval.generation: max_new_tokens and batch_size must be >= 1, got "
                             f"{self.max_new_tokens} and {self.batch_size}")
        if self.samples < 0:
            raise ValueError(f"eval.generation.samples must be >= 0, got {self.samples}")
        if self.samples and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"eval.generation: sampling needs temperature > 0 and 0 < top_p <= 1, got "
                             f"temperature={self.temperature}, top_p={self.top_p}")


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
    samples: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    synced: bool = False,
) -> list[str] | list[list[str]]:
    """Greedy continuations of each prompt (samples=0), or `samples` sampled continuations of each
    (a list per prompt). Prompts are generated in order of length so a batch holds little padding; the
    answers come back in the prompts' order.

    Sampling draws from torch's generators seeded by `seed`, inside a fork of their state: the caller's
    random stream (training's, say) is exactly where it was, and the same seed gives the same samples.

    `synced`: every rank of a sharded model runs this with the same prompts, and each batch goes on until
    every rank's is done (each forward gathers the layers' shards from all ranks).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded_all = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded_all[i]), i))
    n = max(samples, 1)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n) \
        if samples else dict(do_sample=False)
    out: dict[int, list[str]] = {}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=bool(samples)):
        if samples:
            torch.manual_seed(seed)
        desc = f"sample x{samples}" if samples else "generate"
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=bar_off(progress), leave=False):
            idx = order[start : start + batch_size]
            encoded = [encoded_all[i] for i in idx]
            width = max(len(e) for e in encoded)
            ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(encoded):
                ids[i, width - len(e) :] = torch.tensor(e)
                mask[i, width - len(e) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=stop_token_ids(tokenizer),  # the template's turn end and EOS
                synced_gpus=synced,
                **sampling,
            )
            texts = [t.strip() for t in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
            for j, i in enumerate(idx):  # generate returns each prompt's n sequences together
                out[i] = texts[j * n : (j + 1) * n]
    if was_training:
        model.train()
    if samples:
        return [out[i] for i in range(len(prompts))]
    return [out[i][0] for i in range(len(prompts))]
