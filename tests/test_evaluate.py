"""`trace-eval`: any model through the evaluators trace-realign uses, with the same keys and numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONF, FAST, compose_cfg
from hydra import compose, initialize_config_dir

from trace_realign.evaluate import Target, resolve_target
from trace_realign.evaluate import run as evaluate
from trace_realign.train import run as train

EVAL_FAST = [o for o in FAST if not o.startswith(("trainer.", "impact.", "data.", "select."))]


def eval_cfg(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=[*EVAL_FAST, *overrides, f"paths.output_dir={out}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train(compose_cfg([*FAST, "dataset.test_prompts_per_axis=3", "trainer.max_steps=3", "+quiet=true"], out))
    return out


def test_a_run_and_its_start_give_the_keys_and_numbers_of_the_run_itself(trained, tmp_path):
    m = evaluate(eval_cfg(["dataset.test_prompts_per_axis=3", "+quiet=true",
                           f"models={{trace: {trained}, start: 'base:{trained}', m_old: m_old}}"], tmp_path / "ev"))
    run = json.loads((trained / "metrics.json").read_text())
    after = {k[len("eval/after/"):]: v for k, v in run.items() if k.startswith("eval/after/")}
    before = {k[len("eval/before/"):]: v for k, v in run.items() if k.startswith("eval/before/")}
    assert {"tpa", "tpa/shifted", "tpa_ci95/shifted", "utility", "asr/overall", "asr/plain"} <= set(after)
    for label, expected in (("trace", after), ("start", before), ("m_old", before)):
        got = {k[len(f"eval/{label}/"):]: v for k, v in m.items() if k.startswith(f"eval/{label}/")}
        assert got == expected, label  # same keys, same numbers: one code path measures both
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["eval/trace/tpa"] == m["eval/trace/tpa"] and written["eval/items"] == m["eval/items"]
    lines = [json.loads(x) for x in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == m["eval/items"] and {"trace", "start", "m_old"} <= set(lines[0])
    assert (tmp_path / "ev" / "eval" / "trace" / "asr.jsonl").is_file()


def test_a_run_of_another_dataset_configuration_is_refused_by_name(trained, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)trained on another dataset configuration.*dataset.seed: 0 there, 1 now"):
        evaluate(eval_cfg(["dataset.test_prompts_per_axis=3", "seed=1", f"models={{trace: {trained}}}"], tmp_path / "ev"))
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_runs_held_out_on_other_prompts_are_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    (other / "data" / "eval.jsonl").write_text('{"prompt": "something else"}\n')
    with pytest.raises(ValueError, match=r"models \['b'\]: their runs were evaluated on other held-out prompts"):
        evaluate(eval_cfg(["dataset.test_prompts_per_axis=3", f"models={{a: {trained}, b: {other}}}"], tmp_path / "ev"))


def test_what_a_model_spec_names(trained, tmp_path):
    assert resolve_target("t", str(trained)) == Target("t", "run", str(trained / "adapter"), trained)
    base = json.loads((trained / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert resolve_target("s", f"base:{trained}") == Target("s", "base", base, trained)
    assert resolve_target("m", "m_old") == Target("m", "m_old")
    assert resolve_target("h", "Qwen/Qwen2.5-7B-Instruct") == Target("h", "hub", "Qwen/Qwen2.5-7B-Instruct")
    assert resolve_target("f", str(trained / "adapter")).kind == "folder"
    with pytest.raises(ValueError, match="no such folder"):
        resolve_target("x", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not one of"):
        resolve_target("after", "m_old")
    with pytest.raises(ValueError, match="holds no adapter"):
        resolve_target("x", f"base:{tmp_path}")
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "run.json").write_text("{}")
    (failed / "FAILED").write_text("boom")
    with pytest.raises(ValueError, match="that run failed"):
        resolve_target("x", str(failed))
    (failed / "FAILED").unlink()
    with pytest.raises(ValueError, match="neither adapter/ nor model/"):
        resolve_target("x", str(failed))


def test_a_preference_study_of_two_models_by_a_simulated_panel(trained, tmp_path):
    from trace_realign.eval.preference import read_annotations

    m = evaluate(eval_cfg(["dataset.test_prompts_per_axis=3", "+quiet=true", f"models={{mdl_b: {trained}, mdl_a: 'base:{trained}'}}",
                           "eval.preference.enabled=true", "eval.preference.oracle.k=3", "eval.preference.oracle.noise=0.2",
                           "eval.preference.resamples=50", "~eval.evaluators.asr"], tmp_path / "ev"))
    kit = tmp_path / "ev" / "preference"
    files = sorted(p.name for p in (kit / "annotations").iterdir())
    assert files == ["machine-oracle-1.csv", "machine-oracle-2.csv", "machine-oracle-3.csv"]
    key = json.loads((kit / "key.json").read_text())
    assert key["models"] == ["mdl_b", "mdl_a"] and all(set(v.values()) == {"mdl_b", "mdl_a"} for v in key["items"].values())
    assert "mdl_" not in (kit / "items.csv").read_text()  # the models' names stay in the key
    assert m["preference/machine_annotated"] == 1 and m["preference/annotators"] == 3
    assert m["preference/items"] == 12  # the value prompts: 4 axes x 3
    win, lose = m["preference/mdl_b_vs_mdl_a/win_rate"], m["preference/mdl_a_vs_mdl_b/win_rate"]
    assert win + lose == pytest.approx(100.0)  # ties count half to each side
    assert "eval/mdl_b/asr/overall" not in m and "eval/mdl_b/tpa" in m  # an evaluator switched off is not run
    assert read_annotations(kit).models == ["mdl_b", "mdl_a"]


def test_evaluating_before_training_does_not_change_what_training_does(tmp_path):
    """Every evaluator (lm-eval seeds the global generators, sampling draws from them) leaves the random
    state and the model as it found them: the same losses with and without the evaluation before."""
    common = [*FAST, "trainer.max_steps=3", "+quiet=true", "eval.sampling.samples=2", "eval.max_new_tokens=4"]
    with_eval = train(compose_cfg([*common, "eval.before=true"], tmp_path / "a"))
    without = train(compose_cfg([*common, "eval.before=false"], tmp_path / "b"))
    assert "eval/before/capability/trace_utility/exact_match" in with_eval and "eval/before/asr/n" in with_eval
    losses = {k: v for k, v in with_eval.items()
              if k.startswith(("train/loss", "train/first", "impact/")) and not k.endswith("seconds")}
    assert losses and losses == {k: without[k] for k in losses}
    assert with_eval["eval/after/tpa"] == without["eval/after/tpa"]


def test_export_merges_the_adapter_into_a_folder_transformers_loads_alone(trained, tmp_path, monkeypatch, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_realign.export import ExportError, export, hub_token, main
    from trace_realign.models.loading import load_for_eval

    out = tmp_path / "merged"
    assert main([str(trained), "--out", str(out)]) == 0 and f"wrote {out}" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template  # the template generation used travels with the model
    adapted = load_for_eval(str(trained / "adapter"), {})
    ids = torch.tensor([tok("Is it safe to take zinc for my back pain?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)  # the adapter, folded in
        base = json.loads((trained / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert not torch.allclose(merged(ids).logits, load_for_eval(base, {})(ids).logits, atol=1e-5)  # M_old moved
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "FAILED").write_text("boom")
    with pytest.raises(ExportError, match="that run failed"):
        export(failed)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main([str(trained), "--push-to-hub", "org/x"]) == 2 and "needs credentials" in capsys.readouterr().err
    # a token stored by `hf auth login` counts as credentials, as it does for the upload itself
    (tmp_path / "token").write_text("hf_stored")
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    assert hub_token() == "hf_stored"
