"""constraints.txt, the dependency set the suite passed with: every dependency pyproject.toml declares (the base
ones and every extra's) is pinned there, at a version the declaration accepts, and every line is NAME==VERSION.
(.ci/check-installed checks in CI that the environment holds exactly these versions.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_requirements() -> list[Requirement]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's vendored copy of the same parser
        from pip._vendor import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def pinned_versions() -> dict[str, str]:
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.!+-]+)", line)
        assert match, f"constraints.txt:{number}: expected NAME==VERSION, got {line!r}"
        name = normalized(match[1])
        assert name not in pins, f"constraints.txt:{number}: {match[1]} is pinned twice"
        pins[name] = match[2]
    return pins


def test_every_declared_dependency_is_pinned_at_an_accepted_version():
    pins = pinned_versions()
    requirements = declared_requirements()
    assert len(requirements) > 10
    missing = [str(r) for r in requirements if normalized(r.name) not in pins]
    assert not missing, f"declared in pyproject.toml but not pinned in constraints.txt: {missing}"
    rejected = [f"{r} (pinned {pins[normalized(r.name)]})" for r in requirements
                if not r.specifier.contains(pins[normalized(r.name)], prereleases=True)]  # fmt: skip
    assert not rejected, f"constraints.txt pins versions pyproject.toml does not accept: {rejected}"


def test_the_readme_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]" -c constraints.txt' in readme
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "-c constraints.txt" in ci and ".ci/check-installed constraints.txt" in ci


@pytest.mark.parametrize("line", ["torch>=2", "numpy == 2.0", "-e ."])
def test_a_malformed_pin_is_reported_with_its_line(tmp_path, monkeypatch, line):
    (tmp_path / "constraints.txt").write_text(f"# comment\n{line}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="constraints.txt:2: expected NAME==VERSION"):
        pinned_versions()
