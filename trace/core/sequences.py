"""Tokenising (prompt, response) pairs and per-sequence log-probabilities with the prompt masked.

Prompt and response are tokenised separately and concatenated, so the boundary never merges tokens and
the mask is exact; the prompt goes through the model's chat template when its tokenizer has one, and a
prompt too long is cut inside the user's content, never in the template. A response ends with the
template's own turn-end token (EOS without a template). Labels are -100 on prompt and padding, as in TRL.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Rendered as the assistant's content to find what the template writes after it; plain letters, so no
# template escapes or splits it.
TURN_MARKER = "TRACEturnMARKER"
_TURN_ENDS: "weakref.WeakKeyDictionary[Any, tuple[Any, int | None]]" = weakref.WeakKeyDictionary()


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


def turn_end_token_id(tokenizer: Any) -> int | None:
    """The token that ends an assistant turn in the tokenizer's chat template, else its EOS.

    Chat templates close the assistant's turn with a token of their own (`<|eot_id|>` Llama-3,
    `<end_of_turn>` Gemma, `<|im_end|>` ChatML) that need not be EOS: a model trained or stopped on EOS
    alone would never learn, or never notice, the end of its turn. The template is rendered for a user
    turn and an assistant turn holding a marker; the first special token after the marker (whitespace
    before it skipped; what follows it, such as a newline, ignored) is the turn end. No template, or a
    template that writes no special token there, gives EOS.
    """
    template, eos = getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id
    cached = _TURN_ENDS.get(tokenizer)
    if cached is not None and cached[0] == (template, eos):
        return cached[1]
    found = _template_turn_end(tokenizer) if template else None
    turn_end = eos if found is None else found
    _TURN_ENDS[tokenizer] = ((template, eos), turn_end)
    return turn_end


def _template_turn_end(tokenizer: Any) -> int | None:
    """The first special token the chat template writes after the assistant's content, or None."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": TURN_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template that refuses this conversation: EOS is the only guess left
        log.warning("the chat template could not render a user and an assistant turn (%s); responses end "
                    "with EOS", exc)
        return None
    if text.count(TURN_MARKER) != 1:
        return None
    after = text.split(TURN_MARKER, 1)[1]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return int(token_id)
        if tokenizer.decode([token_id]).strip():
            return None  # text before any special token: the template closes the turn without one
    return None


def stop_token_ids(tokenizer: Any) -> int | list[int] | None:
    """What generation stops on: the turn end and EOS (one id when they are the same token)."""
    ids = list(dict.fromkeys(i for i in (turn_end_token_id(tokenizer), tokenizer.eos_token_id) if i is not None))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def encode_pair(tokenizer, prompt: str, response: str, limits: SequenceLimits) -> tuple[list[int], list[int], bool]:
    """input_ids and labels for one (prompt, response); the flag says whether anything was truncated.

    The response ends with the template's turn end (turn_end_token_id), as the model must write it."""
    p_ids, truncated = encode_prompt_within(tokenizer, prompt, limits.max_prompt_length)
    r_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    turn_end = turn_end_token_id(tokenizer)
    if turn_end is not None:
        r_ids.append(turn_end)
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
    """Align logits at t with the token at t+1: (logits, targets with -100 replaced, mask). Logits narrower
    than the labels are those of their last columns (a forward with logits_to_keep)."""
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    logits = logits[:, :-1, :]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits up to float32 for the log-softmax; float64 (a check of exactness) stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log pi(y_t | x, y_<t) over response tokens; one value per sequence."""
    logits, targets, mask = shift_for_loss(logits, labels)
    token_logps = torch.gather(at_least_float32(logits).log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)
