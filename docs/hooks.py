"""MkDocs hooks (mkdocs.yml `hooks:`): the pages generated from the repository, so they cannot drift.

- `index.md` is the README, its links to docs/ made relative to the site;
- `reference/configuration.md` is generated from conf/: every config group with its options, each
  described by its file's own header comment, and the root configs with every key and comment;
- the result plots the pages show (experiments/results/*.png) are added under the same paths, and the
  pages' `../experiments/` links (right on GitHub) are pointed at them.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
REFERENCE = "reference/configuration.md"


def header_comment(path: Path) -> str:
    """The comment block a config file opens with, as one paragraph (Hydra's `@package` line left out)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return " ".join(t for t in lines if t).replace("|", "\\|") or "–"


def group_defaults(root: Path) -> dict[str, str | None]:
    """Each group's default option in a root config's defaults list (`model: tiny` -> {"model": "tiny"})."""
    chosen: dict[str, str | None] = {}
    for item in yaml.safe_load(root.read_text(encoding="utf-8")).get("defaults", []):
        if isinstance(item, dict):
            for key, value in item.items():
                chosen[key.removeprefix("override ").split("@")[0]] = value
    return chosen


def configuration_reference(conf: Path = CONF) -> str:
    """The configuration reference page, read from conf/."""
    defaults = group_defaults(conf / "train.yaml")
    out = ["# Configuration reference", "",
           "Generated from `conf/` each time the site is built. A run composes one option of each group "
           "(`trace-realign GROUP=OPTION`); any key below can be overridden (`trace-realign KEY=VALUE`). "
           "Each option is described by its own file's opening comment.", ""]
    groups = sorted(p for p in conf.rglob("*") if p.is_dir() and any(p.glob("*.yaml")) and p != conf)
    for group in groups:
        name = group.relative_to(conf).as_posix()
        out += [f"## `{name}`", ""]
        if name in defaults:
            out += [f"Default: `{defaults[name]}`." if defaults[name] else "Default: none.", ""]
        out += ["| option | what it is |", "|---|---|"]
        out += [f"| `{p.stem}` | {header_comment(p)} |" for p in sorted(group.glob("*.yaml"))]
        out.append("")
    for root, what in (("train.yaml", "`trace-realign` and `trace-data`"), ("evaluate.yaml", "`trace-eval`")):
        out += [f"## The root config of {what} (`conf/{root}`)", "", "```yaml",
                (conf / root).read_text(encoding="utf-8").rstrip(), "```", ""]
    return "\n".join(out)


def on_files(files, config):  # noqa: ANN001  (mkdocs' hook signature)
    from mkdocs.structure.files import File

    files.append(File.generated(config, REFERENCE, content=configuration_reference()))
    for plot in sorted((ROOT / "experiments" / "results").glob("*.png")):
        files.append(File.generated(config, f"experiments/results/{plot.name}", abs_src_path=str(plot)))
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001
    if page.file.src_uri == "index.md":
        markdown = (ROOT / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
    return markdown.replace("](../experiments/", "](experiments/")
