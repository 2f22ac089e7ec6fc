"""The README is the front door (one page) and docs/ a site that builds strictly, its reference generated."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import yaml

from conftest import ROOT

README_LIMIT = 12 * 1024


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_one_page():
    assert len((ROOT / "README.md").read_bytes()) <= README_LIMIT


def test_the_site_builds_strictly_with_no_warning(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "WARNING" not in res.stderr, res.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "reference" / "configuration" / "index.html").is_file()
    assert "Triage" in (site / "index.html").read_text()  # the home page is the README
    assert not (site / "hooks.py").exists()


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(node):
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for v in node.values() for p in pages(v)]
        return [p for v in node for p in pages(v)]

    listed = set(pages(config["nav"]))
    written = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert written | {hooks().REFERENCE} == listed


def test_the_configuration_reference_lists_every_option_of_every_group():
    page = hooks().configuration_reference()
    sections = page.split("\n## ")
    for group in sorted(p for p in (ROOT / "conf").rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        if group == ROOT / "conf":
            continue
        name = group.relative_to(ROOT / "conf").as_posix()
        section = next(s for s in sections if s.startswith(f"`{name}`"))
        for option in group.glob("*.yaml"):
            assert f"| `{option.stem}` |" in section, (name, option.stem)
    assert "Default: `tiny`." in next(s for s in sections if s.startswith("`model`"))
    # the root config appears whole, comments included
    assert (ROOT / "conf" / "train.yaml").read_text().strip() in page
