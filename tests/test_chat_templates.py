"""Chat templates of real model families (Llama-3, Gemma, ChatML), on tokenizers built here: responses
end with the template's own turn-end token, and generation stops on it as well as on EOS."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trace_realign.core.sequences import SequenceLimits, encode_pair, encode_prompt, stop_token_ids, turn_end_token_id
from trace_realign.eval.generation import generate
from trace_realign.models.loading import build_tokenizer

CORPUS = ["How do I bake bread at home?", "Mix flour, water and yeast, then bake it.", "I cannot help with that."]

# Modelled on the templates the hub tokenizers ship (trimmed of system-prompt and tool handling).
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
    "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = m['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim "
    "+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
CHATML = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# style: (template, bos, eos, the other special tokens, the expected turn end)
STYLES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "chatml": (CHATML, None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    # ChatML whose EOS is its turn end, as SmolLM2's and Qwen2.5-Instruct's tokenizers have it
    "chatml_eos": (CHATML, None, "<|im_end|>", ["<|im_start|>", "<|endoftext|>"], "<|im_end|>"),
}


def chat_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE on CORPUS with the style's special tokens and chat template."""
    template, bos, eos, others, _ = STYLES[style]
    specials = [t for t in (bos, eos, "<pad>") if t] + others
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   additional_special_tokens=others)
    fast.chat_template = template
    return fast


@pytest.mark.parametrize("style", sorted(STYLES))
def test_the_turn_end_is_the_templates_own_token(style):
    tok = chat_tokenizer(style)
    expected = tok.convert_tokens_to_ids(STYLES[style][4])
    assert turn_end_token_id(tok) == expected
    ids, labels, _ = encode_pair(tok, CORPUS[0], CORPUS[1], SequenceLimits(128, 64))
    assert ids[-1] == labels[-1] == expected, "the response is trained to end its turn as the template does"
    # the prompt's turns (system and user in ChatML, the user's elsewhere) and the response's
    assert ids.count(expected) == (3 if style.startswith("chatml") else 2)
    assert tok.eos_token_id not in ids or expected == tok.eos_token_id
    stops = stop_token_ids(tok)
    assert stops == (expected if expected == tok.eos_token_id else [expected, tok.eos_token_id])


def test_a_newline_after_the_turn_end_is_not_taken_for_it():
    tok = chat_tokenizer("gemma")
    rendered = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                       tokenize=False)
    assert rendered.endswith("<end_of_turn>\n")
    assert tok.convert_ids_to_tokens(turn_end_token_id(tok)) == "<end_of_turn>"


def test_no_template_or_a_template_without_a_special_turn_end_gives_eos():
    tok = chat_tokenizer("llama3")
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    assert turn_end_token_id(bare) == bare.eos_token_id
    assert encode_pair(bare, "a", "b", SequenceLimits(32, 16))[0][-1] == bare.eos_token_id
    plain = copy.deepcopy(tok)
    plain.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert turn_end_token_id(plain) == plain.eos_token_id
    # the template changing after a first look is seen
    plain.chat_template = GEMMA.replace("<start_of_turn>", "<|start_header_id|>").replace("<end_of_turn>", "<|eot_id|>")
    assert plain.convert_ids_to_tokens(turn_end_token_id(plain)) == "<|eot_id|>"


def test_the_tiny_models_template_ends_its_turns_with_eos():
    tok = build_tokenizer(CORPUS, vocab_size=300)
    assert turn_end_token_id(tok) == tok.eos_token_id and stop_token_ids(tok) == tok.eos_token_id


class RecordingModel(torch.nn.Module):
    """Stands in for a causal LM: records what generate is asked and answers one token then the turn end."""

    def __init__(self, answer: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer, self.calls = answer, []

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        tail = torch.tensor([self.answer] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


def test_generation_stops_on_the_turn_end_and_on_eos():
    tok = chat_tokenizer("llama3")
    turn_end = tok.convert_tokens_to_ids("<|eot_id|>")
    word = encode_prompt(tok, "bread")[-1]
    model = RecordingModel([word, turn_end])
    texts = generate(model, tok, ["How do I bake bread?"], progress=False)
    assert model.calls[0]["eos_token_id"] == [turn_end, tok.eos_token_id]
    assert "<|eot_id|>" not in texts[0]
