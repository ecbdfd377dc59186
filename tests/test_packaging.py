"""README, Makefile, environment.yml, .ci/run and pyproject.toml stay in step."""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_installs_the_package_from_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    extras = set(pyproject()["optional-dependencies"])
    assert pip_section == [f'-e ".[{",".join(sorted(extras))}]"'] or pip_section == [f"-e .[{','.join(sorted(extras))}]"], (
        f"environment.yml should install the package with every extra ({sorted(extras)}), got {pip_section}")
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    python = next(d for d in conda if d.startswith("python"))
    minimum = pyproject()["requires-python"].removeprefix(">=")
    version = python.split("=")[-1]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split("."))), (python, minimum)
    # no Python package is pinned twice: conda installs only python and pip
    assert set(conda) == {python, "pip"}, f"list Python packages in pyproject.toml, not environment.yml: {conda}"


def test_makefile_and_environment_install_the_same_smollm2():
    make = (ROOT / "Makefile").read_text()
    pinned = re.search(r"SMOLLM2 := (\S+)", make).group(1)
    assert pinned in (ROOT / "environment.yml").read_text()
    assert pinned in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command_with_the_cpu_wheel():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert "make test TORCH=torch==2.13.0" in ci


def test_technique_files_import_only_torch():
    allowed = {"torch"} | set(sys.stdlib_module_names)
    for name in ["lora", "adapters", "prompt_tuning", "p_tuning", "prefix_tuning", "nf4", "qlora"]:
        path = ROOT / "peftkit" / f"{name}.py"
        if not path.exists():
            continue
        top = re.findall(r"^(?:import|from) (\w+)", path.read_text(), re.M)
        assert set(top) <= allowed, f"{path.name} imports {set(top) - allowed} at top level: a technique file needs only torch"
