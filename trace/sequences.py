"""Tokenising (prompt, response) pairs and per-sequence log-probabilities with the prompt masked.

Prompt and response are tokenised separately and concatenated, so the boundary never merges tokens and
the mask is exact; the prompt goes through the model's chat template when its tokenizer has one, and a
prompt too long is cut inside the user's content, never in the template. Labels
are -100 on prompt and padding, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceLimits:
    max_length: int = 512
    max_prompt_length: int = 256

    def __post_init__(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} must be positive and below "
                f"data.max_length={self.max_length}, leaving room for the response"
            )


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it at generation time."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    text = prompt_text(tokenizer, prompt)
    # A chat template writes its own BOS; a bare prompt gets the tokenizer's special tokens.
    return list(tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"])


def encode_prompt_within(tokenizer, prompt: str, limit: int) -> tuple[list[int], bool]:
    """The prompt's ids in at most `limit` tokens, and whether it was cut.

    Through a chat template, the user's content is cut and never the template: the BOS, the role header
    and the generation prompt stay, so training sees the frame generation sees. The end of the content is
    kept (it holds the question). A bare prompt keeps its last `limit` tokens.
    """
    ids = encode_prompt(tokenizer, prompt)
    if len(ids) <= limit:
        return ids, False
    if not getattr(tokenizer, "chat_template", None):
        return ids[-limit:], True
    content = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    keep = max(limit - (len(ids) - len(content)), 0)  # the template's own tokens, as first estimate
    while keep > 0:
        cut = encode_prompt(tokenizer, tokenizer.decode(content[-keep:], skip_special_tokens=True))
        if len(cut) <= limit:  # re-tokenising the cut text may merge differently: shrink until it fits
            return cut, True
        keep -= 1
    raise ValueError(f"data.max_prompt_length={limit} leaves no room for the prompt's content: the chat template "
                     f"alone takes {len(encode_prompt(tokenizer, ''))} tokens; raise data.max_prompt_length")


def encode_pair(tokenizer, prompt: str, response: str, limits: SequenceLimits) -> tuple[list[int], list[int], bool]:
    """input_ids and labels for one (prompt, response); the flag says whether anything was truncated."""
    p_ids, truncated = encode_prompt_within(tokenizer, prompt, limits.max_prompt_length)
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        r_ids.append(tokenizer.eos_token_id)
    room = limits.max_length - len(p_ids)
    if len(r_ids) > room:
        r_ids, truncated = r_ids[:room], True
    return p_ids + r_ids, [IGNORE_INDEX] * len(p_ids) + r_ids, truncated


def pad_batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into tensors."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def shift_for_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits at t with the token at t+1: (logits, targets with -100 replaced, mask)."""
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(y_t | x, y_<t) over response tokens; one value per sequence."""
    logits, targets, mask = shift_for_loss(logits, labels)
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)
