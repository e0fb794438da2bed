"""The install story: environment.yml agrees with pyproject, the Makefile and CI call what the README says."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _env_pip():
    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)


def test_environment_yml_matches_pyproject():
    project = _pyproject()
    pip = _env_pip()
    editable = next(p for p in pip if p.startswith("-e "))
    extras = re.search(r"\[(.*)\]", editable).group(1).split(",")
    expected = set(project["dependencies"])
    for extra in extras:
        expected |= set(project["optional-dependencies"][extra])
    torch_pins = {p for p in pip if p.startswith(("torch==", "torchvision=="))}
    listed = set(pip) - {editable} - torch_pins
    # torch itself is pinned exactly in both places (the Makefile's TORCH_PKGS)
    expected = {d for d in expected if not d.startswith("torch")}
    assert listed == expected


def test_makefile_torch_pins_match_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"TORCH_PKGS \?= (.*)", makefile).group(1).split()
    assert set(pins) == {p for p in _env_pip() if p.startswith(("torch==", "torchvision=="))}


def test_makefile_extras_match_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"EXTRAS \?= (.*)", makefile).group(1).strip()
    editable = next(p for p in _env_pip() if p.startswith("-e "))
    assert editable == f"-e .[{extras}]"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in readme and "make demo" in readme
    commands = [l for l in ci.splitlines() if l.strip() and not l.startswith("#") and not l.startswith(("set ", "cd "))]
    assert commands == ["make test"]
