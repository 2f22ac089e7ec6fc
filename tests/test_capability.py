"""The capability evaluator: lm-eval's tasks on the model in memory, the held-out sums as a local task
whose requests are exactly what our own generation sends, a PeftModel left as it was, and a clear error
without lm-eval."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trace_realign.core.sequences import encode_prompt
from trace_realign.data.world import SyntheticWorld, WorldJudge
from trace_realign.data.world.synthetic import UTILITY_ANSWER, UTILITY_PROMPT
from trace_realign.eval.base import EvalInputs
from trace_realign.eval.capability import Capability, metric_key
from trace_realign.eval.generation import GenerationSettings, generate
from trace_realign.models.loading import build_tokenizer

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld()


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world.corpus(), 400)


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def inputs_for(model, tokenizer, world, items, tmp_path: Path, max_new_tokens: int = 8) -> EvalInputs:
    return EvalInputs(model=model, tokenizer=tokenizer, judge=WorldJudge(), new=world.new, old=world.old, items=items,
                      generation=GenerationSettings(max_new_tokens=max_new_tokens), work_dir=tmp_path / "eval",
                      progress=False)


def test_metric_keys_drop_the_none_filter_and_keep_the_others():
    assert metric_key("acc,none") == "acc"
    assert metric_key("acc_stderr,none") == "acc_stderr"
    assert metric_key("exact_match,strict-match") == "exact_match_strict-match"
    assert metric_key("exact_match_stderr,strict-match") == "exact_match_strict-match_stderr"
    assert metric_key("alias") is None and metric_key("sample_len") is None


# -- (a) tasks of lm-eval's own kind, from YAMLs in include_path ------------------------------------

def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a generation task scored through a named filter, on small JSON files."""
    folder.mkdir()
    mc = [{"q": f"Is {a} more than {b}?", "choices": ["yes", "no"], "label": int(a <= b)} for a, b in
          [(2, 1), (1, 2), (3, 1), (0, 4)]]
    gen = [{"q": f"What is {a} plus {b}?", "a": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'mc.jsonl'}}}, cache_dir: {folder / 'cache'}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")
    (folder / "toy_gen.yaml").write_text(f"""task: toy_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {folder / 'gen.jsonl'}}}, cache_dir: {folder / 'cache'}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: [], do_sample: false, max_gen_toks: 4}}
filter_list:
  - name: first-int
    filter: [{{function: regex, regex_pattern: "(-?\\\\d+)"}}, {{function: take_first}}]
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""")
    return folder


def test_local_tasks_report_each_metric_with_its_stderr_and_count(tmp_path, tokenizer, world):
    folder = write_tasks(tmp_path / "tasks")
    model = tiny_llama(tokenizer)
    evaluator = Capability(tasks=["toy_mc", "toy_gen"], include_path=[str(folder)], limit=3, batch_size=2)
    result = evaluator(inputs_for(model, tokenizer, world, world.eval_prompts(), tmp_path))
    m = result.metrics
    expected = {f"capability/toy_mc/{k}" for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")}
    expected |= {f"capability/toy_gen/{k}" for k in ("exact_match_first-int", "exact_match_first-int_stderr", "n")}
    assert set(m) == expected  # no items task unless asked for
    assert m["capability/toy_mc/n"] == m["capability/toy_gen/n"] == 3  # limit
    for key, value in m.items():
        if not key.endswith("/n"):
            assert 0.0 <= value <= 1.0, key
    # an accuracy on 3 samples that is neither 0 nor 1 has a standard error sqrt(p(1-p)/(n-1))
    p = m["capability/toy_mc/acc"]
    assert m["capability/toy_mc/acc_stderr"] == pytest.approx((p * (1 - p) / 2) ** 0.5)
    assert (tmp_path / "eval" / "capability" / "tasks.json").is_file()  # lm-eval's own report


# -- (b) the held-out sums as a task, through a stand-in for the model's generate --------------------

class Answers:
    """A stand-in for model.generate: reads the sum back from each prompt's tokens and answers it right when
    its first number is even, one too high when odd; records the prompt tokens and the settings it got."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts, self.settings = tokenizer, [], []

    def __call__(self, input_ids, attention_mask, **kwargs):
        self.settings.append({**kwargs, "width": input_ids.shape[1]})
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = ids[mask.bool()].tolist()
            self.prompts.append(prompt)
            a, b = map(int, UTILITY_PROMPT.search(self.tokenizer.decode(prompt, skip_special_tokens=True)).groups())
            answer = UTILITY_ANSWER.format(c=a + b if a % 2 == 0 else a + b + 1)
            rows.append(ids.tolist() + self.tokenizer(answer, add_special_tokens=False)["input_ids"]
                        + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("chat", [True, False], ids=["chat_template", "plain"])
def test_items_task_scores_the_sums_on_the_requests_our_generate_sends(tmp_path, tokenizer, world, chat):
    tok = copy.deepcopy(tokenizer)
    if not chat:
        tok.chat_template = None
    items = world.eval_prompts()
    utility = [(i, it) for i, it in enumerate(items) if it["kind"] == "utility"]
    model = tiny_llama(tok)
    model.generate = answers = Answers(tok)
    result = Capability(items_task=True, batch_size=7)(inputs_for(model, tok, world, items, tmp_path, 5))

    # exact match by hand: right exactly when the first number is even
    right = [int(UTILITY_PROMPT.search(it["prompt"]).group(1)) % 2 == 0 for _, it in utility]
    p, n = sum(right) / len(right), len(right)
    assert 0 < p < 1 and n == world.utility_eval
    m = result.metrics
    assert m["capability/trace_utility/exact_match"] == pytest.approx(p)
    assert m["capability/trace_utility/exact_match_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    assert m["capability/trace_utility/n"] == n
    assert {i for i, _ in utility} == set(result.item_rows)
    for (i, it), ok in zip(utility, right):
        assert result.item_rows[i]["capability"]["correct"] == ok
        assert int(result.item_rows[i]["capability"]["read"]) - int(it["answer"]) == (0 if ok else 1)

    # the requests: greedy, as many new tokens as eval.max_new_tokens, stopping at EOS ...
    for kw in answers.settings:
        assert kw["do_sample"] is False and "temperature" not in kw
        assert kw["max_length"] - kw["width"] == 5
        assert [c.sequence for c in kw["stopping_criteria"]] == [tok.eos_token]
    # ... on the very tokens our generate sends (sequences.prompt_text, then encode_prompt)
    lm_eval_prompts = sorted(answers.prompts)
    assert lm_eval_prompts == sorted(encode_prompt(tok, it["prompt"]) for _, it in utility)
    answers.prompts.clear()
    generate(model, tok, [it["prompt"] for _, it in utility], max_new_tokens=5, progress=False)
    assert sorted(answers.prompts) == lm_eval_prompts


def test_items_without_answers_are_left_out_and_none_at_all_runs_nothing(tmp_path, tokenizer, world):
    items = [it for it in world.eval_prompts() if it["kind"] == "utility"][:3]
    unanswered = [{k: v for k, v in it.items() if k != "answer"} for it in items]
    model = tiny_llama(tokenizer)
    model.generate = Answers(tokenizer)
    result = Capability(items_task="sums")(inputs_for(model, tokenizer, world, unanswered[:1] + items[1:], tmp_path))
    assert result.metrics["capability/sums/n"] == 2 and set(result.item_rows) == {1, 2}
    assert Capability(items_task=True)(inputs_for(model, tokenizer, world, unanswered, tmp_path)).metrics == {}


# -- (c) a PeftModel is evaluated as it is and left as it was -----------------------------------------

def test_a_peft_model_is_evaluated_with_its_adapter_and_left_unchanged(tmp_path, tokenizer, world):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # an adapter that changes the outputs
    model.train()
    model.base_model.model.lm_head.eval()  # a mixture of modes, to be kept module by module
    modes = {name: m.training for name, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = torch.tensor([encode_prompt(tokenizer, "What is 1 plus 2?")])
    with torch.no_grad():
        logits = model(probe).logits
        with model.disable_adapter():
            assert not torch.allclose(model(probe).logits, logits)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    items = [it for it in world.eval_prompts() if it["kind"] == "utility"][:4]
    result = Capability(items_task=True, batch_size=2)(inputs_for(model, tokenizer, world, items, tmp_path, 4))
    assert result.metrics["capability/trace_utility/n"] == 4

    assert isinstance(model, PeftModel) and model.active_adapter == "default"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe).logits, logits)  # the adapter still applies, unmerged
    # lm-eval seeds the generators; the caller's streams go on where they were
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


# -- (d) lm-eval is needed only when the evaluator runs ------------------------------------------------

WITHOUT_LM_EVAL = r"""
import sys
from trace_realign.eval import build_evaluators
evaluator = build_evaluators({"capability": {"_target_": "trace_realign.eval.capability.Capability",
                                             "items_task": True}})["capability"]
print("imported:", "lm_eval" in sys.modules)
sys.modules["lm_eval"] = None  # as if it were not installed
try:
    evaluator(None)
except ImportError as exc:
    print("error:", exc)
"""


def test_without_lm_eval_the_package_imports_and_the_evaluator_says_what_to_install():
    res = subprocess.run([sys.executable, "-c", WITHOUT_LM_EVAL], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "imported: False" in lines
    assert any(line.startswith("error:") and "pip install lm-eval" in line for line in lines), lines


# -- the configs -------------------------------------------------------------------------------------

def test_default_measures_the_sums_offline_and_paper_adds_its_benchmarks():
    from conftest import compose_cfg

    from trace_realign.eval import build_evaluators

    default = build_evaluators(compose_cfg([]).eval.evaluators)
    assert list(default) == ["tpa", "utility", "capability", "asr"]
    assert default["capability"].tasks == [] and default["capability"].items_task == "trace_utility"
    paper = build_evaluators(compose_cfg(["eval=paper"]).eval.evaluators)
    assert list(paper) == ["tpa", "utility", "capability", "asr"]
    assert paper["capability"].tasks == ["gpqa_main_zeroshot", "mmlu", "hellaswag", "gsm8k"]
    assert paper["capability"].items_task == "trace_utility" and paper["capability"].limit is None
