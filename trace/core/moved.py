"""The flat module paths of earlier releases (trace_realign.triage, trace_realign.llm_oracle, ...) still
import, as the module at its new path, with a FutureWarning naming it: configs whose `_target_` names an
old path, scripts and resumed checkpoints keep working."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Sequence

# old path -> new path (trace_realign.oracle and trace_realign.data became packages that re-export their
# old public names; trace_realign.tables stayed the app, its steps moved to trace_realign.report)
MOVED = {
    "records": "core.records", "sequences": "core.sequences", "logs": "core.logs", "rundir": "core.rundir",
    "llm_oracle": "oracle.llm", "verdicts": "oracle.verdicts", "triage": "oracle.triage",
    "pipeline": "data.pipeline", "stages": "data.stages", "splits": "data.splits", "pku": "data.pku",
    "synthvaluebench": "data.synthvaluebench", "world": "data.world", "world.synthetic": "data.world.synthetic",
    "model": "models.loading", "prealign": "models.prealign",
    "objective": "method.objective", "losses": "method.losses", "impact": "method.impact", "module": "method.module",
    "select": "method.select", "strategies": "method.strategies", "resume": "method.resume",
    "ablation": "method.ablation", "schedules": "method.schedules",
    "plots": "report.plots", "loggers": "report.loggers", "eval.preference_cli": "preference",
}
PACKAGE = "trace_realign"


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there", FutureWarning, stacklevel=3)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the module at its new path is already executed; the import machinery has just given it the old
        # path's spec, and it keeps its own
        module.__spec__ = self.spec


class MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        old = fullname.removeprefix(PACKAGE + ".")
        if fullname == old or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"{PACKAGE}.{MOVED[old]}"))


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        # first: an old path under a moved package (trace_realign.world.synthetic) would otherwise load a second
        # copy of the module through its parent's __path__; only the old paths of MOVED are answered here
        sys.meta_path.insert(0, MovedModules())
