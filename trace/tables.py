"""`trace-tables`: run folders (a sweep's jobs, single runs, or folders holding either) to the paper's tables.

    trace-tables multirun/table4_ablation/2026-01-01_12-00-00-000000
    trace-tables multirun/table3_data_size/... --plots --paper table3 --out tables/table3

Jobs are grouped by their overrides less the seed (.hydra/overrides.yaml; without it by the settings of
run.json that differ between the runs). A row is a method (run.json's method.name; an ablated one is
named for its ablation) in one setting of the other varying keys; a column is a metric. Each cell
aggregates the seeds: mean ± standard deviation and n, with the 95 % t-interval in table.csv. A `before`
row is the starting model M_old (eval/before/*).
Each row is compared with the baseline method paired by seed. Failed and unfinished jobs are listed and
never averaged; the paper's own numbers appear as marked reference rows, never mixed with runs.

The steps live in trace_realign.report: collect (run folders), aggregate (statistics and rows),
render (tables and plots' data), plots (drawing), loggers (wandb).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from trace_realign.report.aggregate import build_report
from trace_realign.report.collect import DEFAULT_METRICS, FORMATS, TablesError, load_jobs
from trace_realign.report.drift import expand_shifts, has_chains, render_drift, write_drift
from trace_realign.report.loggers import log_to_wandb
from trace_realign.report.render import jobs_markdown, make_plots, render_markdown, write_outputs

# -------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="trace-tables", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folders, sweep folders, or folders holding them")
    p.add_argument("--metrics", nargs="+", metavar="KEY",
                   help=f"metrics.json keys (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--rows", metavar="KEY",
                   help="the row-label column: method (default) or a varying setting, e.g. data.size")
    p.add_argument("--baseline", metavar="NAME",
                   help="the method the paired table compares with (default: trace, else full)")
    p.add_argument("--out", metavar="DIR", type=Path, help="where the files go (default: the first PATH)")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS), help="files to write (default: all)")
    p.add_argument("--paper", nargs="+", metavar="TABLE",
                   help="show the paper's reference rows of these tables (e.g. table4); `none`: not even those the "
                        "runs' task name names")
    p.add_argument("--plots", action="store_true",
                   help="PNG plots: metric vs data.size / data.label_noise, training curves")
    p.add_argument("--wandb", action="store_true",
                   help="log the table and plots to one wandb run (offline without credentials)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        jobs = expand_shifts(load_jobs(args.paths))  # a chain of policy shifts: one job per shift
        if not any(j.status == "finished" for j in jobs):
            print(jobs_markdown([j for j in jobs if j.status == "failed"],
                                [j for j in jobs if j.status == "unfinished"]), file=sys.stderr)
            raise TablesError(f"no finished run under {', '.join(map(str, args.paths))} (the jobs above)")
        report = build_report(jobs, args.metrics, args.rows, args.baseline, args.paper)
        out = args.out or Path(args.paths[0])
        print(render_markdown(report), end="")
        written = write_outputs(report, out, args.format)
        if has_chains(jobs):
            print("\n" + render_drift(jobs), end="")
            written += write_drift(jobs, out, args.plots)
        images: list[Path] = []
        if args.plots:
            images, notes = make_plots(report, jobs, out)
            for n in notes:
                print(f"note: {n}")
        if args.wandb:
            # the training jobs log into the wandb group of their task (conf/logger/wandb.yaml): join it
            task = next((j.task_name for j in jobs if j.task_name), None)
            where = log_to_wandb(report, images, task or Path(args.paths[0]).resolve().name, out)
            print(f"wandb: logged to {where}")
        for path in [*written, *images]:
            print(f"wrote {path}")
    except (TablesError, ImportError) as exc:  # ImportError: matplotlib or wandb missing, said plainly
        print(f"trace-tables: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
