"""Tokenising (prompt, response) pairs, padding, and per-sequence log-probabilities with the prompt masked."""

from __future__ import annotations

import copy

import pytest
import torch

from trace_realign.core.sequences import (
    IGNORE_INDEX,
    SequenceLimits,
    encode_pair,
    encode_prompt,
    pad_batch,
    prompt_text,
    sequence_logps,
)
from trace_realign.models.loading import build_tokenizer

CORPUS = [
    "How do I bake bread at home?",
    "Mix flour, water, salt and yeast, then bake it for forty minutes.",
    "I cannot help with that request.",
    "Tell me a short story about a brave dog.",
    "The dog ran across the field and saved the cat.",
]
PROMPT = "How do I bake bread at home?"
RESPONSE = "Mix flour, water, salt and yeast, then bake it for forty minutes."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus=CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def plain_tok(tok):
    # The same vocabulary without a chat template: prompts must go in raw.
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def bos_tok(tok):
    # The same vocabulary with a tokenizer that writes BOS itself, as most hub tokenizers do.
    from tokenizers.processors import TemplateProcessing

    t = copy.deepcopy(tok)
    t._tokenizer.post_processor = TemplateProcessing(single=f"{t.bos_token} $A",
                                                     special_tokens=[(t.bos_token, t.bos_token_id)])
    assert t("x")["input_ids"][0] == t.bos_token_id != t("x", add_special_tokens=False)["input_ids"][0]
    return t


def response_ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


# -- encode_pair --


def test_tokenizer_has_chat_template_and_specials(tok):
    # The rest of this file relies on these.
    assert tok.chat_template
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id


def test_encode_pair_masks_prompt_and_ends_in_eos(tok):
    ids, labels, truncated = encode_pair(tok, PROMPT, RESPONSE, SequenceLimits())
    p_ids = encode_prompt(tok, PROMPT)
    r_ids = response_ids(tok, RESPONSE)
    assert truncated is False
    assert len(ids) == len(labels) == len(p_ids) + len(r_ids) + 1
    # Prompt first, then the response tokens, then EOS.
    assert ids == p_ids + r_ids + [tok.eos_token_id]
    assert labels[: len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    assert labels[len(p_ids) :] == r_ids + [tok.eos_token_id]
    assert labels[-1] == tok.eos_token_id
    # The response labels decode back to the response.
    assert tok.decode(labels[len(p_ids) : -1]) == RESPONSE


def test_encode_pair_prompt_goes_through_chat_template(tok):
    ids, labels, _ = encode_pair(tok, PROMPT, RESPONSE, SequenceLimits())
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    prompt_tokens = tok.convert_ids_to_tokens(ids[:n_prompt])
    # The tiny template: <|bos|><|user|>{prompt}<|assistant|>, so the response follows the assistant tag.
    assert prompt_tokens[0] == tok.bos_token
    assert prompt_tokens[1] == "<|user|>"
    assert prompt_tokens[-1] == "<|assistant|>"
    assert tok.decode(ids[2 : n_prompt - 1]) == PROMPT
    # BOS appears once: the template writes it, the tokenizer must not add another.
    assert ids.count(tok.bos_token_id) == 1


def test_bos_once_whether_the_template_or_the_tokenizer_writes_it(bos_tok):
    with_template = encode_prompt(bos_tok, PROMPT)
    assert with_template.count(bos_tok.bos_token_id) == 1 and with_template[0] == bos_tok.bos_token_id
    plain = copy.deepcopy(bos_tok)
    plain.chat_template = None
    raw = encode_prompt(plain, PROMPT)  # no template: the tokenizer's own special tokens are the prompt's
    assert raw[0] == plain.bos_token_id and raw[1:] == list(plain(PROMPT, add_special_tokens=False)["input_ids"])
    # the response never gets one
    ids, labels, _ = encode_pair(bos_tok, PROMPT, RESPONSE, SequenceLimits())
    assert ids.count(bos_tok.bos_token_id) == 1 and bos_tok.bos_token_id not in labels


def test_no_chat_template_uses_raw_prompt(tok, plain_tok):
    assert prompt_text(plain_tok, PROMPT) == PROMPT
    assert prompt_text(tok, PROMPT) != PROMPT
    ids, labels, truncated = encode_pair(plain_tok, PROMPT, RESPONSE, SequenceLimits())
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert not truncated
    assert ids[:n_prompt] == list(plain_tok(PROMPT)["input_ids"])
    assert plain_tok.decode(ids[:n_prompt], skip_special_tokens=True) == PROMPT
    role_ids = set(plain_tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]))
    assert not role_ids & set(ids)
    # The response part is identical whatever the prompt formatting.
    _, chat_labels, _ = encode_pair(tok, PROMPT, RESPONSE, SequenceLimits())
    assert [x for x in labels if x != IGNORE_INDEX] == [x for x in chat_labels if x != IGNORE_INDEX]


def test_a_long_prompt_is_cut_in_its_content_never_in_the_chat_template(tok):
    full_prompt = encode_prompt(tok, PROMPT)
    head = encode_prompt(tok, "")  # BOS, the user tag, the assistant tag: the template alone
    limit = len(head) + 3
    assert len(full_prompt) > limit
    ids, labels, truncated = encode_pair(tok, PROMPT, RESPONSE, SequenceLimits(max_length=200, max_prompt_length=limit))
    assert truncated is True
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert 0 < n_prompt <= limit and ids[:n_prompt] != full_prompt[-n_prompt:]
    # the template's frame is intact: it starts as the full prompt starts and ends with the generation prompt
    assert ids[:2] == full_prompt[:2] and ids[n_prompt - 1] == full_prompt[-1]
    # what is left of the content is the end of the user's text (it holds the question)
    kept = tok.decode(ids[:n_prompt], skip_special_tokens=True)
    assert kept and PROMPT.endswith(kept.strip())
    # the response is intact
    assert labels[n_prompt:] == response_ids(tok, RESPONSE) + [tok.eos_token_id]


def test_a_limit_below_the_template_itself_is_an_error_naming_the_setting(tok):
    with pytest.raises(ValueError, match="data.max_prompt_length=2 leaves no room"):
        encode_pair(tok, PROMPT, RESPONSE, SequenceLimits(max_length=200, max_prompt_length=2))


def test_a_bare_prompt_keeps_its_last_tokens(plain_tok):
    full = encode_prompt(plain_tok, PROMPT)
    ids, labels, truncated = encode_pair(plain_tok, PROMPT, RESPONSE, SequenceLimits(max_length=200, max_prompt_length=5))
    assert truncated is True and ids[:5] == full[-5:]


def test_encode_pair_truncates_long_response_from_the_right(tok):
    p_ids = encode_prompt(tok, PROMPT)
    r_ids = response_ids(tok, RESPONSE)
    limits = SequenceLimits(max_length=len(p_ids) + 4, max_prompt_length=len(p_ids))
    ids, labels, truncated = encode_pair(tok, PROMPT, RESPONSE, limits)
    assert truncated is True
    assert len(ids) == len(labels) == limits.max_length
    assert ids[: len(p_ids)] == p_ids
    assert labels[len(p_ids) :] == r_ids[:4]  # the start of the response is kept; EOS falls off
    assert tok.eos_token_id not in labels


def test_encode_pair_exact_fit_is_not_truncated(tok):
    p_ids = encode_prompt(tok, PROMPT)
    r_ids = response_ids(tok, RESPONSE)
    limits = SequenceLimits(max_length=len(p_ids) + len(r_ids) + 1, max_prompt_length=len(p_ids))
    ids, labels, truncated = encode_pair(tok, PROMPT, RESPONSE, limits)
    assert truncated is False
    assert labels[-1] == tok.eos_token_id
    # One token less and the EOS is cut.
    short = SequenceLimits(max_length=limits.max_length - 1, max_prompt_length=len(p_ids))
    _, labels2, truncated2 = encode_pair(tok, PROMPT, RESPONSE, short)
    assert truncated2 is True and labels2[-1] != tok.eos_token_id


# -- pad_batch --


def test_pad_batch_right_pads_with_ignored_labels(tok):
    rows = [
        encode_pair(tok, PROMPT, RESPONSE, SequenceLimits())[:2],
        encode_pair(tok, "Tell me a short story about a brave dog.", "I cannot help.", SequenceLimits())[:2],
    ]
    lens = [len(r[0]) for r in rows]
    assert lens[0] != lens[1]
    batch = pad_batch(rows, tok.pad_token_id)
    width = max(lens)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for key in batch:
        assert batch[key].shape == (2, width) and batch[key].dtype == torch.long
    for i, (ids, lab) in enumerate(rows):
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["labels"][i, :n].tolist() == lab
        assert batch["attention_mask"][i, :n].tolist() == [1] * n
        # Padding: pad id in the inputs, -100 in the labels, 0 in the attention mask.
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i, n:].tolist() == [0] * (width - n)
    # Labels are -100 exactly on prompt and padding.
    n_prompt = [sum(1 for x in lab if x == IGNORE_INDEX) for _, lab in rows]
    for i in range(2):
        ignored = (batch["labels"][i] == IGNORE_INDEX).nonzero().flatten().tolist()
        assert ignored == list(range(n_prompt[i])) + list(range(lens[i], width))


# -- sequence_logps --


def manual_logps(logits, labels):
    """Sum over t >= 1 with labels[t] != -100 of log_softmax(logits[t-1])[labels[t]], one loop per element."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t - 1].double()
            total += float(row[y] - torch.logsumexp(row, 0))
        out.append(total)
    return out


def random_case(seed=0):
    # Two sequences of width 7 over a vocabulary of 11: prompt lengths 3 and 2, the second padded by 2.
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, 11, generator=g) * 3
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 9, 0, 10],
            [IGNORE_INDEX, IGNORE_INDEX, 7, 1, 3, IGNORE_INDEX, IGNORE_INDEX],
        ]
    )
    return logits, labels


def test_sequence_logps_matches_manual_sum():
    logits, labels = random_case()
    got = sequence_logps(logits, labels)
    assert got.shape == (2,)
    assert got.tolist() == pytest.approx(manual_logps(logits, labels), rel=1e-5)
    assert (got < 0).all()


def test_sequence_logps_ignores_prompt_and_padding_logits():
    logits, labels = random_case(1)
    before = sequence_logps(logits, labels)
    changed = logits.clone()
    g = torch.Generator().manual_seed(5)
    # Row 0: positions 0, 1 predict prompt tokens; position 6 predicts nothing.
    changed[0, [0, 1, 6]] += torch.randn(3, 11, generator=g) * 10
    # Row 1: position 0 predicts a prompt token; positions 4, 5, 6 predict padding or nothing.
    changed[1, [0, 4, 5, 6]] += torch.randn(4, 11, generator=g) * 10
    assert torch.allclose(sequence_logps(changed, labels), before)


def test_sequence_logps_uses_last_prompt_position():
    # The logits at the last prompt position predict the first response token: they must count.
    logits, labels = random_case(2)
    before = sequence_logps(logits, labels)
    changed = logits.clone()
    changed[0, 2, 4] += 5.0  # row 0: prompt length 3, first response token is 4
    after = sequence_logps(changed, labels)
    assert after[0] > before[0]
    assert after[1] == before[1]


def test_sequence_logps_does_not_count_target_at_position_zero():
    # labels[:, 0] can never be predicted (nothing precedes it): a label there must not matter.
    logits, labels = random_case(3)
    labels2 = labels.clone()
    labels2[1, 0] = 5
    assert torch.allclose(sequence_logps(logits, labels2), sequence_logps(logits, labels))


def test_sequence_logps_on_encoded_batch(tok):
    # End to end on real encodings: only response tokens (including EOS) contribute.
    rows = [
        encode_pair(tok, PROMPT, RESPONSE, SequenceLimits())[:2],
        encode_pair(tok, "Tell me a short story about a brave dog.", "The dog ran.", SequenceLimits())[:2],
    ]
    batch = pad_batch(rows, tok.pad_token_id)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, batch["labels"].shape[1], len(tok), generator=g)
    got = sequence_logps(logits, batch["labels"])
    assert got.tolist() == pytest.approx(manual_logps(logits, batch["labels"]), rel=1e-5)


def test_prompt_limit_must_leave_room_for_a_response():
    # A prompt limit at or above max_length would leave no room for the response: refused up front.
    with pytest.raises(ValueError, match="max_prompt_length"):
        SequenceLimits(max_length=6, max_prompt_length=64)
    with pytest.raises(ValueError, match="max_prompt_length"):
        SequenceLimits(max_length=6, max_prompt_length=6)  # equal leaves no room either
    with pytest.raises(ValueError, match="max_prompt_length"):
        SequenceLimits(max_length=6, max_prompt_length=0)
    assert SequenceLimits(max_length=6, max_prompt_length=5).max_prompt_length == 5


# the tiny chat template itself takes 3 of the prompt tokens
@pytest.mark.parametrize("max_length,max_prompt_length", [(6, 4), (8, 7), (12, 4)])
def test_encode_pair_never_exceeds_max_length(tok, max_length, max_prompt_length):
    limits = SequenceLimits(max_length=max_length, max_prompt_length=max_prompt_length)
    ids, labels, truncated = encode_pair(tok, PROMPT, RESPONSE, limits)
    assert truncated
    assert len(ids) == len(labels) <= limits.max_length
    assert any(label != -100 for label in labels), "at least one response token survives"
