"""Experiment loggers built from config."""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path
from typing import Any, Sequence

from trace_realign.report.aggregate import Report
from trace_realign.report.collect import TablesError
from trace_realign.report.render import cell_text, label_cells


def wandb_credentials_present() -> bool:
    """True when wandb could log in without asking: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_logger(mode: str | None = None, **kwargs: Any):
    """Lightning's WandbLogger that never prompts: offline unless credentials are present.

    The key is read by wandb itself from the environment; it is never passed here, so it cannot reach
    the config, the logs or the run's files.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode is None:
        mode = "online" if wandb_credentials_present() else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(kwargs.get("save_dir") or ".").mkdir(parents=True, exist_ok=True)
    return WandbLogger(mode=mode, anonymous="never", **kwargs)
# ------------------------------------------------------------------------------------------------- wandb


def wandb_table_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """The main table in long form for a wandb.Table."""
    columns = ["row", "kind", *report.keys, "metric", "mean", "std", "n", "ci95", "min", "max", "cell"]
    data = []
    for r in report.rows:
        for m in report.metrics:
            s = r.cells.get(m)
            if r.kind == "paper" and m in r.reported:
                data.append([r.label, r.kind, *label_cells(r, report.keys), m, r.reported[m][0], None, None, None,
                             None, None, cell_text(r, m)])
            elif s is not None:
                clean = [None if isinstance(x, float) and math.isnan(x) else x for x in (s.mean, s.std)]
                rest = [None if isinstance(x, float) and math.isnan(x) else x for x in (s.ci95, s.min, s.max)]
                data.append([r.label, r.kind, *label_cells(r, report.keys), m, *clean, s.n, *rest, cell_text(r, m)])
    return columns, data


def log_to_wandb(report: Report, images: Sequence[Path], group: str, out: Path) -> str:
    """One summary run (job_type `tables`): the table, the paired table and the plots. Offline unless
    credentials are present (or WANDB_MODE says otherwise); only the table's own options go into its
    config, never the environment. Returns the run's folder."""
    try:
        import wandb
    except ImportError as exc:
        raise TablesError("--wandb needs wandb: pip install wandb") from exc
    from trace_realign.report.loggers import wandb_credentials_present

    mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if wandb.run is not None:
        wandb.finish()  # a run left open in this process would otherwise receive the table
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT") or "trace-realign", group=group, job_type="tables",
        # the folder given explicitly: wandb reads WANDB_DIR only when it first sets up in a process
        mode=mode, dir=os.environ.get("WANDB_DIR") or str(out),
        config={"metrics": report.metrics, "baseline": report.baseline, "rows": report.keys,
                "paper_tables": list(report.paper_tables)},
    )
    try:
        columns, data = wandb_table_rows(report)
        payload: dict[str, Any] = {"tables/results": wandb.Table(columns=columns, data=data)}
        if report.paired:
            pc = ["row", *report.keys, "metric", "n_pairs", "mean_diff", "low", "high", "significant"]
            pd = [[r.label, *label_cells(r, report.keys), m, p.diff.n,
                   *(None if math.isnan(x) else x for x in (p.diff.mean, p.diff.low, p.diff.high)), p.significant]
                  for r, res in report.paired for m, p in res.items()]
            payload["tables/paired"] = wandb.Table(columns=pc, data=pd)
        for path in images:
            payload[f"plots/{path.stem}"] = wandb.Image(str(path))
        run.log(payload)
        return str(run.dir)
    finally:
        run.finish()


