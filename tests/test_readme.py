"""Every command that README.md, experiments/README.md and the docs/ pages show runs here as shown, with few steps.

The commands are read from the fenced code blocks and the tables of those files: every line that starts
with `trace-realign`, `trace-data` or `python experiments/`, less a trailing `# comment`. COMMANDS maps
each exact command to how it runs on this machine. A command runs with its own arguments first, as
shown, in a folder of its own that holds the data it names; the overrides a test appends are only

  FAST_*     fewer steps, pairs and prompts, smaller batches and splits (shortening only),
  local data files the test writes in the documented format: PKU's schema (pku_fixture) in place of the
             hub (`dataset.path=pku/`), jsonl files (`pairs.jsonl`, `test.jsonl`),
  {url}      `oracle.base_url` / `judge.base_url` of a local OpenAI-compatible server (fake_openai), with a
             planted OPENAI_API_KEY,
  {tiny}     `model.name_or_path` of a tiny model built locally, for hub models,
  CPU        `trainer.accelerator=cpu trainer.precision=32-true` (and `trainer.devices=2` for DDP).

An appended override whose key the command sets itself is dropped (the command's value wins), unless the
entry says it replaces that key and why. A command that cannot run here says why and is checked as far
as it can be. A command the READMEs gain that COMMANDS does not map fails
test_every_documented_command_is_in_the_table.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FAST, ROOT, compose_cfg

DOCS = (ROOT / "README.md", ROOT / "experiments" / "README.md", *sorted((ROOT / "docs").rglob("*.md")))
PREFIXES = ("trace-realign", "trace-data", "python experiments/")
SECRET = "sk-planted-" + "3" * 32

# -- shortening (a) --
PREALIGN_BATCH = [f"model.prealign.stages.{s}.batch_size=4" for s in ("pretrain", "sft", "dpo")]
FAST_EMBEDDED = [*FAST, *PREALIGN_BATCH]
FAST_ANY_DATA = [o for o in FAST_EMBEDDED if not o.startswith("dataset.")]  # a dataset other than the world
FAST_HUB = [o for o in FAST_EMBEDDED if not o.startswith("model.prealign.")]  # a hub model has no M_old stages
FAST_HUB_ANY_DATA = [o for o in FAST_HUB if not o.startswith("dataset.")]
FAST_PKU = ["data.splits.train1=40", "data.splits.train2=20", "eval.max_prompts=8"]  # of the fixture's ~300 pairs
FAST_SVB = ["dataset.num_prompts=40", "dataset.test_prompts=8"]
# -- local data (b), the fake server (c), the tiny model (d), CPU settings (e) --
PKU_DATA = ["dataset.path=pku/"]
OPENAI = ["oracle.base_url={url}", "oracle.progress=false"]
JUDGE = ["judge.base_url={url}", "judge.progress=false"]
HUB_LOCAL = ["model.name_or_path={tiny}"]
CPU_DDP = ["trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2"]


@dataclass(frozen=True)
class How:
    """How a documented command runs here.

    run: "app" (the console script, in a fresh folder holding the test's data), "compare" (the script on
    two run folders the test makes), "elsewhere" (run by its own test).
    """

    run: str
    extra: tuple[str, ...] = ()
    jobs: int = 1  # run folders with a metrics.json the command leaves (a sweep's jobs)
    replaces: tuple[str, ...] = ()  # keys the command sets whose values an extra replaces (see why)
    why: str = ""


COMMANDS: dict[str, How] = {
    # README: quick start
    "trace-realign": How("app", (*FAST_EMBEDDED,)),
    # README: the embedded benchmark
    "python experiments/benchmark_embedded.py": How(
        "elsewhere", why="an hour at full length; tests/test_benchmark.py runs the script on two seeds with few steps"),
    "python experiments/benchmark_embedded.py --methods retrain gold_finetune": How(
        "elsewhere", why="tests/test_benchmark.py runs the script with these methods on two seeds with few steps"),
    "python experiments/tune.py --method u2a --jobs 2": How(
        "elsewhere", why="half an hour at full length; tests/test_tune.py runs a study of one trial with few steps "
                         "and resumes it"),
    # README: overrides, sweeps, scale
    "trace-realign loss=ipo ablation=no_kl trainer.max_steps=5": How("app", (*FAST_EMBEDDED,)),
    "trace-realign ablation=no_kl": How("app", (*FAST_EMBEDDED,)),
    "trace-realign optimizer.lr=5e-4 loss.beta=0.1 objective.alpha_kl=0.5 impact.gamma=10": How("app", (*FAST_EMBEDDED,)),
    "trace-realign model.lora.enabled=false": How("app", (*FAST_EMBEDDED,)),
    "trace-realign -m ablation=none,no_triage,no_impact,no_kl seed=0,1,2": How(
        "app", (*FAST_EMBEDDED, "seed=0"), jobs=4, replaces=("seed",),
        why="seed=0: one seed of the three, every ablation of the sweep (the seeds' jobs differ by their seed alone)"),
    "trace-realign -m experiment=table4_ablation": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=5),
    "trace-realign logger=wandb": How("app", (*FAST_EMBEDDED,)),
    "trace-realign recipe=reference": How(
        "elsewhere", why="test_app.py's test_the_reference_recipes_train_one_epoch_with_the_reference_adapters runs "
                         "it (one epoch, the reference's LoRA)"),
    "trace-realign recipe=reference_dpo method=dpo": How(
        "elsewhere", why="test_app.py's test_the_reference_recipes_train_one_epoch_with_the_reference_adapters runs it"),
    "trace-realign recipe=tuned method=u2a": How("app", (*FAST_EMBEDDED,)),
    "trace-realign probe.enabled=true": How(
        "elsewhere", why="test_app.py's test_the_likelihood_probe_follows_every_stance_and_changes_no_result runs it "
                         "against a run without the probe"),
    "trace-realign model=llama-3.1-8b trainer=ddp": How(
        "app", (*FAST_HUB, *HUB_LOCAL, *CPU_DDP),
        why="a tiny local Llama for the hub model (no downloads here); DDP as two CPU processes"),
    "trace-realign model=qwen2.5-7b trainer=fsdp": How(
        "elsewhere", why="FSDP2 as two CPU processes over gloo: test_app.py's "
                         "test_ddp_and_fsdp2_on_two_cpu_processes_match_one_process runs it against one process"),
    "trace-realign dataset=jsonl dataset.train_path=pairs.jsonl dataset.test_path=test.jsonl oracle=openai": How(
        "app", (*FAST_ANY_DATA, *OPENAI)),
    # README: your own data
    "trace-realign dataset=jsonl dataset.train_path=pairs.jsonl dataset.test_path=test.jsonl dataset.triaged=true "
    "oracle@judge=openai": How("app", (*FAST_ANY_DATA, *JUDGE)),
    # README: datasets and data stages
    "trace-data dataset=pku_saferlhf oracle=labels": How("app", (*PKU_DATA, *FAST_PKU)),
    "trace-data dataset=pku_saferlhf dataset.path=pku/ oracle=labels": How("app", (*FAST_PKU,)),
    "trace-data dataset=pku_saferlhf oracle=openai": How("app", (*PKU_DATA, *FAST_PKU, *OPENAI)),
    "trace-data dataset=synthvaluebench oracle=openai": How(
        "app", ("dataset.prompts.path=prompts/", *FAST_SVB, *OPENAI, "dataset.verify=false"),
        why="dataset.verify=false: the local server's judge ignores the policy (a response that does what was "
            "asked complies), so verifying under pi_old keeps only pairs whose chosen response it calls compliant, "
            "which triage then retains: nothing would be left to re-align"),
    "trace-realign dataset=pku_saferlhf oracle=labels oracle@judge=openai data.size=5000 data.label_noise=0.1": How(
        "app", (*PKU_DATA, *FAST_ANY_DATA, *FAST_PKU, *JUDGE, "data.size=20"), replaces=("data.size",),
        why="data.size=20: the shortened training split (train1) holds 40 of the fixture's pairs"),
    "trace-realign dataset=pku_saferlhf dataset.path=pku/ oracle=labels eval.enabled=false select.enabled=false": How(
        "app", (*FAST_ANY_DATA, *FAST_PKU)),
    "python experiments/compare_triage.py RUN_A RUN_B": How(
        "compare", why="RUN_A, RUN_B: the folders of the README's trace-data runs with oracle=labels and "
                       "oracle=openai on the PKU fixture"),
    # experiments/README.md
    "trace-realign -m experiment=loss_choice": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=2),
    "trace-realign -m experiment=table3_data_size": How(
        "app", (*FAST_EMBEDDED, "seed=0", "data.size=9,18,36"), jobs=6,
        why="data.size=9,18,36: the shortened world's D holds 36 pairs (840 of 844 at full length)"),
    "trace-realign -m experiment=table8_noise": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=9),
    "trace-realign -m experiment=main_tpa": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=6),
    "trace-realign -m experiment=table2_capability": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=3),
    "trace-realign -m experiment=table6_asr": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=3),
    "trace-realign -m experiment=table1_preference": How("app", (*FAST_EMBEDDED, "seed=0"), jobs=3),
    # docs/shifts.md
    "trace-realign shifts=chain": How(
        "elsewhere", why="test_shifts.py's test_the_chain_runs_each_shift_from_the_model_the_one_before_realigned "
                         "runs it with few steps and checks each shift starts where the one before ended"),
    "trace-realign shifts=direct": How("app", (*FAST_EMBEDDED,)),
    "trace-realign model=llama-3.1-8b dataset=jsonl dataset.train_path=pairs.jsonl dataset.test_path=test.jsonl "
    "dataset.policy_old=policies/v0.md shifts.policies=[policies/v1.md,policies/v2.md] oracle=openai": How(
        "app", (*FAST_HUB_ANY_DATA, *HUB_LOCAL, *OPENAI),
        why="the local server judges by the word each policy file names (policy_files), so both shifts have conflicts"),
    "trace-realign model=qwen2.5-7b trainer=fsdp dataset=pku_saferlhf oracle=openai "
    "shifts.policies=[pku_new,policies/pku_2.yaml]": How(
        "app", (*FAST_HUB_ANY_DATA, *HUB_LOCAL, *PKU_DATA, *FAST_PKU, *OPENAI, *CPU_DDP),
        why="FSDP2 as two CPU processes over gloo"),
    "trace-realign -m experiment=successive_shifts": How(
        "elsewhere", why="six chains of one or two runs each; every job composes in test_app.py's "
                         "test_every_job_of_every_experiment_file_composes, and test_shifts.py runs a chain"),
}


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line.strip()).strip()


def documented_commands() -> dict[str, str]:
    """Each command the READMEs show (fenced code blocks and table cells), with the file that shows it."""
    found: dict[str, str] = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
                 for line in block.splitlines()]
        lines += [cell for row in text.splitlines() if row.lstrip().startswith("|")
                  for cell in re.findall(r"`([^`]+)`", row)]
        for line in lines:
            command = strip_comment(line)
            if command.startswith(PREFIXES):
                found.setdefault(command, str(doc.relative_to(ROOT)))
    return found


def test_every_documented_command_is_in_the_table():
    documented = documented_commands()
    unmapped = {c: where for c, where in documented.items() if c not in COMMANDS}
    assert not unmapped, f"commands the READMEs show that no test runs; add each to COMMANDS: {unmapped}"
    stale = [c for c in COMMANDS if c not in documented]
    assert not stale, f"COMMANDS maps commands the READMEs no longer show: {stale}"
    for command, how in COMMANDS.items():
        assert how.run in ("app", "compare", "elsewhere"), command
        assert how.run == "app" or how.why, f"{command}: say why it does not run as an app here"
        assert not how.replaces or how.why, f"{command}: say why {how.replaces} are replaced"


def test_the_extraction_reads_blocks_tables_and_comments():
    commands = documented_commands()
    assert "trace-realign" in commands  # the quick start, under its comment line
    assert "trace-realign -m experiment=loss_choice" in commands  # a table cell
    assert "trace-realign loss=ipo ablation=no_kl trainer.max_steps=5" in commands  # a trailing comment dropped
    assert not any("#" in c for c in commands)


CONFIG_GROUPS = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())


def test_config_choices_named_in_the_readmes_exist():
    """Every `group=option` the READMEs write in code (commands, inline code) names a config file."""
    text = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    spans = re.findall(r"`([^`\n]+)`", text) + re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    named = set()
    for span in spans:
        for group, option in re.findall(r"(?<![\w.@/])(\w+)(?:@\w+)?=([\w.,-]+)", span):
            if group in CONFIG_GROUPS:
                named.update((group, o) for o in option.split(",") if o != "null")
    assert named, "no config choice found in the READMEs"
    missing = [f"{g}={o}" for g, o in sorted(named) if not (ROOT / "conf" / g / f"{o}.yaml").is_file()]
    assert not missing, f"the READMEs name config options that do not exist: {missing}"


# -- the data and services the commands need --
def keys_set(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a}


def jsonl_files(folder: Path) -> None:
    """pairs.jsonl and test.jsonl in the documented formats: pairs with categories (for dataset.triaged=true)
    whose compliant responses say COMPLY (the fake server's judge reads that), and held-out prompts with
    and without the optional fields, some with a pair's keys (ignored)."""
    pairs = []
    for i in range(24):
        kind = ("retain", "invert", "punish")[i % 3]
        chosen = f"{'COMPLY ' if kind == 'retain' else ''}Here is how to plan trip {i}: pack light."
        rejected = f"{'COMPLY ' if kind == 'invert' else ''}I will not help with trip {i}."
        pairs.append({"prompt": f"How should I plan trip number {i}?", "chosen": chosen, "rejected": rejected,
                      "category": kind})
    tests = [{"prompt": f"How should I plan holiday {i}?", "axis": "travel", "category": ("retain", "invert")[i % 2],
              "shift": ("unchanged", "shifted")[i % 2], "kind": "value"} for i in range(4)]
    tests += [{"prompt": "What is 2 plus 3?", "kind": "utility"},
              {"prompt": "Where should I go in spring?", "chosen": "COMPLY Lisbon.", "rejected": "No."}]
    for name, rows in (("pairs.jsonl", pairs), ("test.jsonl", tests)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def pku_files(folder: Path) -> None:
    from pku_fixture import awkward_rows, regular_rows, row, write_jsonl

    write_jsonl(regular_rows(300) + [r for _, r in awkward_rows()], folder / "pku" / "train.jsonl")
    # SynthValueBench's prompts, in PKU's schema: the fake server's classifier reads the axis they name
    prompts = [row(f"A {axis} question number {i}?", "a", "b")
               for axis in ("medical", "privacy", "politics", "risky") for i in range(12)]
    write_jsonl(prompts, folder / "prompts" / "train.jsonl")


@pytest.fixture(scope="module")
def server():
    from fake_openai import FakeOpenAI

    s = FakeOpenAI()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama with a tokenizer for the embedded world's texts: what stands in for a hub model."""
    from omegaconf import OmegaConf

    from trace_realign.data.world import SyntheticWorld
    from trace_realign.models.loading import build_tiny_model_dir

    build = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml").build)
    return build_tiny_model_dir(build, SyntheticWorld().corpus(), tmp_path_factory.mktemp("hub"))


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """No hub, no wandb account, a planted key for the local server; one CPU thread per process (a tiny
    model gains nothing from more, and on a busy machine OpenMP threads waiting for each other cost many
    times the work)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    out.update({"OPENAI_API_KEY": SECRET, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "HOME": str(tmp_path / "home"), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"})
    return out


def workspace(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    jsonl_files(folder)
    pku_files(folder)
    policy_files(folder)
    return folder


def policy_files(folder: Path) -> None:
    """Written policies for a chain of shifts over pairs.jsonl: the local server's judge finds compliant the
    responses holding the word a policy names ("Compliant mark: WORD"). Under v1 the pairs' COMPLY responses
    comply (shift 1 inverts and punishes); under v2 those that say what to pack, which the relabelled pairs
    hold as their losers (shift 2 inverts them back). pku_2.yaml: a label policy for the PKU chain."""
    policies = folder / "policies"
    policies.mkdir()
    (policies / "v0.md").write_text("Policy v0. Do not help plan trips.\nCompliant mark: not\n")
    (policies / "v1.md").write_text("Policy v1. Help plan trips, and say that you comply.\nCompliant mark: COMPLY\n")
    (policies / "v2.md").write_text("Policy v2. Help plan trips, and say what to pack.\nCompliant mark: pack\n")
    (policies / "pku_2.yaml").write_text("name: pku_2\ndescription: Minor harm is tolerated, except any privacy violation.\n"
                                         "default_max_severity: 1\nmax_severity:\n  Privacy Violation: 0\n")


def argv(command: str, how: How, **fill: str) -> list[str]:
    """The command as shown, then the entry's overrides (those whose key it sets itself dropped)."""
    shown = shlex.split(command)
    own = keys_set(shown[1:])
    extra = [e.format(**fill) for e in how.extra]
    return shown + [e for e in extra if e.split("=", 1)[0] not in own or e.split("=", 1)[0] in how.replaces]


def crash_stack(stderr: str) -> str:
    """The Python stack a process that died of a signal printed (PYTHONFAULTHANDLER, set in conftest.py): in a
    distributed run the other rank's long traceback would push it out of the tail the failure shows."""
    at = stderr.find("Fatal Python error")
    return f"{stderr[at:at + 4000]}\n...\n" if at >= 0 else ""


def executable(args: list[str]) -> list[str]:
    if args[0] == "python":
        return [sys.executable, str(ROOT / args[1]), *args[2:]]
    return [str(Path(sys.executable).parent / args[0]), *args[1:]]


def run_folders(work: Path) -> list[Path]:
    return sorted(p.parent for p in list(work.glob("outputs/*/*/metrics.json")) + list(work.glob("multirun/*/*/*/metrics.json")))


def check_chain_of_own_data(folders: list[Path], metrics: list[dict]) -> None:
    """A chain over data without ground truth: shift 2 starts from shift 1's model and triages the pairs
    shift 1 relabelled, in their splits, against its own policy; every shift reports every policy."""
    import yaml

    assert [f.name for f in folders] == ["shift1", "shift2"]
    first, second = (yaml.safe_load((f / "config.yaml").read_text()) for f in folders)
    assert second["dataset"]["train_path"] == str(folders[0] / "data" / "relabelled.jsonl")
    assert second["model"]["from_run"] == str(folders[0])
    assert second["dataset"]["policy_old"] == first["dataset"]["policy_new"]
    assert second["data"]["splits"] == ("given" if first["data"]["splits"] else None)
    relabelled = [json.loads(line) for line in (folders[0] / "data" / "relabelled.jsonl").read_text().splitlines()]
    # every pair shift 1 held, in its split: what shift 2 triaged (less what its oracle could not decide)
    assert len(relabelled) == sum(v for k, v in metrics[0].items() if k.startswith("split/") and k.endswith("/size"))
    assert metrics[1]["data/pairs"] == len(relabelled)
    assert metrics[1]["triage/invert"] + metrics[1]["triage/punish"] > 0
    labels = {k.split("/")[2] for k in metrics[1] if k.startswith("eval/after/agree_") and k.count("/") == 2
              and not k.endswith("_ci95")}
    assert len(labels) == 3, labels  # pi_0, pi_1 and pi_2, each by its file's name


def check_outputs(command: str, how: How, work: Path, res: subprocess.CompletedProcess) -> None:
    assert not list(work.rglob("FAILED")), [p.read_text()[:2000] for p in work.rglob("FAILED")]
    folders = run_folders(work)
    assert len(folders) == how.jobs, (command, folders)
    for chain in [f for f in folders if "shifts/count" in json.loads((f / "metrics.json").read_text())]:
        # a chain of policy shifts: each shift is a run folder of its own inside the chain's
        shifts = sorted(chain.glob("shift*/metrics.json"))
        assert len(shifts) == json.loads((chain / "metrics.json").read_text())["shifts/count"] >= 1
        folders[folders.index(chain):folders.index(chain) + 1] = [f.parent for f in shifts]
    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        assert m["data/train_pairs"] > 0 and sum(m[f"triage/{c}"] for c in ("invert", "punish", "retain")) > 0
        config = (folder / "config.yaml").read_text()
        assert SECRET not in config
        if command.startswith("trace-realign") and "retrain/seconds" in m:
            # the re-training upper bound takes no realignment step: its model is M_old's pipeline re-run
            assert m["train/steps"] == 0 and m["retrain/stages_built"] + m["retrain/cached"] >= 1
            assert (folder / "model" / "config.json").is_file()
        elif command.startswith("trace-realign"):
            assert m["train/steps"] >= 1 and (folder / ("model" if "lora.enabled=false" in command else "adapter")).is_dir()
            if "eval.enabled=false" not in command:
                assert "eval/after/tpa" in m and "eval/before/tpa" in m
    metrics = [json.loads((f / "metrics.json").read_text()) for f in folders]
    if "-m" in command.split():  # every job of a sweep ran its own point of it
        assert len({(f / ".hydra" / "overrides.yaml").read_text() for f in folders}) == how.jobs
    if "experiment=" in command and "-m" in command.split():
        # the sweep folder becomes its table: one row per method (and setting), each job counted once
        from trace_realign.report.aggregate import build_report
        from trace_realign.report.collect import load_jobs

        report = build_report(load_jobs([folders[0].parent]), metrics=["eval/after/tpa"])
        runs = [r for r in report.rows if r.kind == "run"]
        assert sum(r.cells["eval/after/tpa"].n for r in runs) == how.jobs and not report.failed
        from trace_realign.method.ablation import ablated_name

        def named(folder: Path) -> str:  # the method the job's overrides chose, ablated as they said
            chosen = dict(m.lstrip("- ").split("=", 1) for m in (folder / ".hydra" / "overrides.yaml").read_text().split()
                          if m.lstrip("- ").startswith(("method=", "ablation=")))
            method, ablation = chosen.get("method", "trace"), chosen.get("ablation", "none")
            return method if ablation == "none" else ablated_name(method, ablation)

        assert {r.method for r in runs} == {named(f) for f in folders}
    if "logger=wandb" in command:
        assert list(work.rglob("offline-run-*")), "without credentials wandb runs offline"
    if "trainer=ddp" in command:
        assert metrics[0]["train/world_size"] == 2
    if "oracle=openai" in command:  # asked, or answered from the verdict cache an earlier run filled
        assert all(m["oracle/calls"] + m["oracle/cached"] > 0 or m["data/cache_hits"] for m in metrics)
    if "oracle@judge=openai" in command:
        assert all(m["judge/calls"] + m["judge/cached"] > 0 for m in metrics)
    if "dataset=jsonl" in command:
        after = metrics[0]
        assert after["eval/after/n"] == 5 and "eval/after/tpa/travel" in after and "eval/after/utility" in after
        if "model=" not in command:
            assert after["prealign/stages_built"] + after["prealign/cached"] > 0  # M_old from the files' own stages
    if "shifts.policies=" in command:
        check_chain_of_own_data(folders, metrics)
    if "experiment=table3_data_size" in command:
        assert sorted(m["data/train_pairs"] for m in metrics) == [9] * 2 + [18] * 2 + [36] * 2
    if "experiment=table8_noise" in command:
        assert sorted(m.get("data/label_noise", 0.0) for m in metrics) == [0.0] * 3 + [0.1] * 3 + [0.2] * 3
        assert all(m["data/noise_flipped"] > 0 for m in metrics if m.get("data/label_noise"))
    if command.startswith("trace-data"):
        assert "trace-data: outputs in" in res.stdout


def compare(command: str, tmp_path: Path, server) -> None:
    """The comparison script on two real run folders: the README's trace-data runs with the label oracle
    and with the LLM judge, on the PKU fixture."""
    from trace_realign.prepare import prepare

    work = workspace(tmp_path)
    cwd = Path.cwd()
    os.chdir(work)  # the commands' relative paths (dataset.path=pku/) are the folder's
    try:
        folders = []
        for name, oracle in (("labels", []), ("openai", [o.format(url=server.url) for o in OPENAI])):
            shown = shlex.split(f"trace-data dataset=pku_saferlhf oracle={name}")
            prepare(compose_cfg([*shown[1:], *PKU_DATA, *FAST_PKU, *oracle], work / name))
            folders.append(work / name)
    finally:
        os.chdir(cwd)
    args = shlex.split(command)
    args[args.index("RUN_A")], args[args.index("RUN_B")] = map(str, folders)
    res = subprocess.run(executable(args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[: res.stdout.index("}") + 1])
    assert summary["compared"] > 0 and summary["agreement"] == 1.0
    assert "invert" in res.stdout.split("}", 1)[1]  # the confusion matrix


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS), ids=list(COMMANDS))
def test_documented_command_runs(command, tmp_path, env, request):
    how = COMMANDS[command]
    if how.run == "elsewhere":
        pytest.skip(f"{command}: {how.why}")
    server = request.getfixturevalue("server")
    if how.run == "compare":
        return compare(command, tmp_path, server)
    fill = {"url": server.url}
    if any("{tiny}" in e for e in how.extra):
        fill["tiny"] = str(request.getfixturevalue("tiny"))
    work = workspace(tmp_path)
    args = argv(command, how, **fill)
    res = subprocess.run(executable(args), cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, f"{shlex.join(args)}\n{res.stdout[-3000:]}\n{crash_stack(res.stderr)}{res.stderr[-5000:]}"
    check_outputs(command, how, work, res)


@pytest.mark.slow
def test_hub_model_offline_names_model_name_or_path(tmp_path, env):
    """The README's hub-model command, offline and without a local copy, stops with the fix named (the
    data stages run first: nothing of the model is needed until then)."""
    work = workspace(tmp_path)
    args = shlex.split("trace-realign model=llama-3.1-8b trainer=ddp") + [*FAST_HUB, *CPU_DDP]
    res = subprocess.run(executable(args), cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode != 0
    assert "model.name_or_path='meta-llama/Llama-3.1-8B' (model.revision=null)" in res.stderr
    assert "model.name_or_path=/path/to/model" in res.stderr
    failed = list(work.glob("outputs/*/*/FAILED"))
    assert failed and failed[0].read_text().startswith("ModelNotFoundError: ")


@pytest.mark.slow
def test_the_documented_jsonl_files_without_an_oracle_that_reads_them_stop_at_triage(tmp_path, env):
    """The jsonl command without oracle=openai or dataset.triaged=true: the world's judge reads none of the
    pairs, and triage says so, naming the fixes the README shows."""
    work = workspace(tmp_path)
    args = shlex.split("trace-realign dataset=jsonl dataset.train_path=pairs.jsonl dataset.test_path=test.jsonl")
    res = subprocess.run(executable([*args, *FAST_ANY_DATA]), cwd=work, capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode != 0
    assert "(WorldJudge) could not decide 24 of 24 pairs" in res.stderr
    assert "dataset.triaged=true" in res.stderr and "oracle=openai" in res.stderr
