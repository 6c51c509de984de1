"""Everything the code and the documents cite ships in the repository (issue 23): the method document, the
description of the authors' files, benchmark scripts and results, configs; and the LICENSE pyproject declares."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("src/ceprompt/**/*.py"),
           *ROOT.glob("src/ceprompt/configs/*.yaml"), *ROOT.glob("benchmarks/*.py"), ROOT / ".ci" / "run",
           *(p for p in ROOT.glob("tests/*.py") if p.name != Path(__file__).name)]
OUTPUTS = {"results.md"}  # files ceprompt writes for the user (the demo's report), not files of the repository
MARKDOWN = re.compile(r"[\w./-]*\w\.md\b")
REPO_PATH = re.compile(r"(?<![\w./~-])((?:docs|benchmarks|configs|tests|src|\.ci)/[\w./{},-]*\w)")


def expand(path: str) -> list[str]:
    """``configs/demo_stage{1,2}.yaml`` -> both names."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    return [x for alt in match.group(1).split(",") for x in expand(path[:match.start()] + alt + path[match.end():])]


def test_every_cited_document_and_repository_path_exists() -> None:
    names = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = []
    for source in SOURCES:
        text = source.read_text()
        for cited in MARKDOWN.findall(text):
            name = cited.rsplit("/", 1)[-1]
            if name not in OUTPUTS and name not in names and not (ROOT / cited).is_file():
                missing.append(f"{source.relative_to(ROOT)} cites {cited}")
        for cited in REPO_PATH.findall(text):
            for path in expand(cited.rstrip(".")):
                if not (ROOT / path).exists():
                    missing.append(f"{source.relative_to(ROOT)} cites {path}")
    assert not missing, "\n".join(sorted(set(missing)))


def test_method_sections_cited_by_number_exist() -> None:
    method = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", method, re.M)}
    for source in SOURCES:
        for numbers in re.findall(r"docs/method\.md sections? ([\d\-, ]+\d)", source.read_text()):
            cited = {int(n) for n in re.findall(r"\d+", numbers)}
            assert cited <= sections, f"{source.relative_to(ROOT)} cites sections {sorted(cited)} of {sorted(sections)}"


def test_the_declared_license_file_ships() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    for name in project["license-files"]:
        assert "MIT License" in (ROOT / name).read_text()


def test_readme_configuration_reference_is_generated_from_the_config() -> None:
    from ceprompt.experiment.reference import END, START, markdown

    readme = (ROOT / "README.md").read_text()
    table = readme.partition(START)[2].partition(END)[0].strip()
    assert table == markdown().strip(), "run: python -m ceprompt.experiment.reference README.md"
    for key in ("run.precision", "head.top_k", "cat.vision_prompts", "optim.grad_clip"):
        assert f"| `{key}` |" in table


def test_every_command_and_option_in_readme_exists() -> None:
    """The Commands table names only verbs and options the command line has."""
    from ceprompt.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    readme = (ROOT / "README.md").read_text()
    table = readme.partition("## Commands")[2].partition("\n## ")[0]
    commands = re.findall(r"^\| `ceprompt ([^`]*)`", table, re.M)
    assert len(commands) >= 15
    for command in commands:
        words = command.split()
        if not words or words[0].startswith("-"):
            continue
        sub = verbs[words[0]]
        if words[0] == "export":
            sub = next(a for a in sub._actions if a.dest == "format").choices[words[1]]
        known = {s for a in sub._actions for s in a.option_strings}
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", command):
            assert option in known, f"README's `ceprompt {words[0]}` shows {option}, which it does not take"


def test_readme_demo_table_is_the_benchmark_results() -> None:
    """One source for the demo's figures: the README table is written from benchmarks/results/demo.json."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("demo_benchmark", ROOT / "benchmarks" / "demo_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index(bench.TABLE_START) + len(bench.TABLE_START):readme.index(bench.TABLE_END)]
    assert table.strip() == bench.readme_table(report).strip()
