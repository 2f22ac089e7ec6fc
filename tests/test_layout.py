"""The package's shape: modules grouped by stage with imports running one way, every config `_target_`
instantiates, every console script resolves, and the flat module paths of earlier releases still import."""

from __future__ import annotations

import ast
import importlib
import logging
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
from conftest import CONF, ROOT, compose_cfg
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

SRC = ROOT / "trace"
# Bottom to top: a module imports from its own layer or the ones below, never above. The apps (one per
# console script, and steps.py, the build steps they share) sit at the top level of the package.
LAYERS = ["core", "oracle", "data", "models", "eval", "method", "report", "apps"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["trace_realign", *parts])


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "core"  # the package's __init__: everything imports it, so it may import only the core
    return parts[1] if parts[1] in LAYERS else "apps"


def project_imports(path: Path) -> set[str]:
    """Every trace_realign module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("trace_realign")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trace_realign"):
            # `from trace_realign.report import plots` imports the module trace_realign.report.plots
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if (SRC / Path(*sub.split(".")[1:])).with_suffix(".py").is_file() else node.module)
    return found


def test_imports_run_one_way_from_the_apps_down():
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        here = module_name(path)
        for target in project_imports(path):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(here)):
                upward.append(f"{here} ({layer(here)}) imports {target} ({layer(target)})")
    assert not upward, "\n".join(upward)


def test_every_module_belongs_to_a_layer_and_the_top_level_holds_only_apps():
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")
    assert top == ["evaluate", "export", "preference", "prepare", "steps", "tables", "train"]
    packages = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS[:-1])


def targets(node, where: str = "") -> list[tuple[str, dict]]:
    """Every node of a resolved config that names a `_target_`, outermost first, with where it sits."""
    if isinstance(node, dict):
        own = [(where, node)] if "_target_" in node else []
        return own + [t for k, v in node.items() for t in targets(v, f"{where}.{k}".lstrip("."))]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in targets(v, f"{where}[{i}]")]
    return []


def group_options() -> list[tuple[str, str]]:
    """Every option of every config group a run composes (Hydra's own settings and sweeps aside)."""
    return [(g.name, o.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and g.name not in ("hydra", "experiment", "paths")
            for o in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", group_options())
def test_every_target_in_conf_instantiates(group, option, tmp_path, monkeypatch):
    """Each option of each group, composed as the apps compose it: every `_target_` it names is built
    by the step that builds it in a run, with the arguments the config gives."""
    import torch

    from trace_realign.eval import build_evaluators
    from trace_realign.steps import build_judges, build_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # a key is read at build time; no call is made here
    extra = {("dataset", "jsonl"): ["dataset.train_path=x.jsonl"],
             ("oracle", "labels"): ["dataset=pku_saferlhf", "oracle@judge=openai"],  # labels judge no text
             }.get((group, option), [])
    cfg = compose_cfg([f"{group}={option}", f"paths.cache_dir={tmp_path / 'cache'}", *extra], tmp_path / "run")
    named = {node["_target_"] for _, node in targets(OmegaConf.to_container(cfg, resolve=True))}
    built: set[str] = set()

    def record(node) -> None:
        tree = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        built.update(n["_target_"] for _, n in targets(tree))

    source = instantiate(cfg.dataset)
    record(cfg.dataset)
    oracle, judge, _ = build_judges(cfg, source)
    assert oracle is not None and judge is not None
    record(cfg.oracle)
    if cfg.get("judge"):
        record(cfg.judge)
    assert set(build_evaluators(cfg.eval.evaluators)) == {k for k, v in cfg.eval.evaluators.items() if v}
    record(cfg.eval.evaluators)
    assert len(build_loggers(cfg)) == len([c for c in (cfg.get("logger") or {}).values() if c])
    record(cfg.get("logger") or {})
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer)(params=params)
    record(cfg.optimizer)
    if cfg.get("scheduler"):
        instantiate(cfg.scheduler)(optimizer=optimizer)
        record(cfg.scheduler)
    strategy = cfg.trainer.get("strategy")
    if str(cfg.trainer.accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        if OmegaConf.is_dict(strategy):  # a GPU trainer cannot start here: its strategy is built alone
            assert instantiate(strategy) is not None
            record(strategy)
    else:
        instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        record(cfg.trainer)
    gpu_trainer = {t for _, n in targets(OmegaConf.to_container(cfg.trainer, resolve=True)) for t in [n["_target_"]]
                   if t == "lightning.Trainer"} if str(cfg.trainer.accelerator) in ("gpu", "cuda") else set()
    assert named - built <= gpu_trainer, f"{group}={option}: no step of a run builds {sorted(named - built - gpu_trainer)}"


def test_the_console_filter_hydra_logging_names_is_built():
    node = OmegaConf.load(CONF / "hydra" / "default.yaml").job_logging.filters.console
    assert isinstance(get_object(node["()"])(), logging.Filter)


def test_every_console_script_resolves_to_a_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"trace-realign", "trace-data", "trace-tables", "trace-eval", "trace-preference", "trace-export"}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("old,new", [
    ("trace_realign.triage", "trace_realign.oracle.triage"),
    ("trace_realign.llm_oracle", "trace_realign.oracle.llm"),
    ("trace_realign.world.synthetic", "trace_realign.data.world.synthetic"),
    ("trace_realign.model", "trace_realign.models.loading"),
    ("trace_realign.eval.preference_cli", "trace_realign.preference"),
])
def test_a_module_path_of_an_earlier_release_imports_the_moved_module_with_a_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__name__ == module.__spec__.name == new  # the moved module is still itself


def test_targets_of_an_earlier_release_still_locate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for old, new in [("trace_realign.llm_oracle.OpenAIOracle", "trace_realign.oracle.llm.OpenAIOracle"),
                         ("trace_realign.world.SyntheticWorld", "trace_realign.data.world.SyntheticWorld"),
                         ("trace_realign.schedules.cosine_with_warmup", "trace_realign.method.schedules.cosine_with_warmup"),
                         ("trace_realign.data.JsonlSource", "trace_realign.data.sources.JsonlSource"),
                         ("trace_realign.oracle.Oracle", "trace_realign.oracle.base.Oracle")]:
            assert get_object(old) is get_object(new), old
    with pytest.raises(ImportError):
        importlib.import_module("trace_realign.no_such_module")


def test_every_package_and_its_data_files_are_installed():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {module_name(p) for p in SRC.rglob("__init__.py")}
    assert packages <= set(tool["packages"]), sorted(packages - set(tool["packages"]))
    for data in sorted(p for p in SRC.rglob("*") if p.suffix in (".yaml", ".yml", ".json")):
        owner = data.parent  # the package that holds the file
        while not (owner / "__init__.py").is_file():
            owner = owner.parent
        patterns = tool["package-data"].get(module_name(owner / "__init__.py"), [])
        assert any(data.relative_to(owner).match(p) for p in patterns), f"{data.relative_to(ROOT)}: not in package-data"
