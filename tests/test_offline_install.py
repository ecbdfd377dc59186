"""The offline set-up for workshops: `make wheels` gathers wheels, `make setup WHEELS=dir` reads only them.

Exercised with two small packages instead of the course's (a wheel folder of the whole course is gigabytes):
the same Makefile targets and the same pip command `make setup` runs, in a fresh virtual environment.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("six", "colorama")


def make(*args):
    done = subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_setup_installs_from_the_wheel_folder_alone(tmp_path):
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    make("wheels", f"WHEEL_DIR={wheels}", f"WHEEL_REQS={SMALL[0]}", f"SMOLLM2={SMALL[1]}", f"PYTHON={sys.executable}")
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == sorted(SMALL)

    # every install line of `make setup` goes through the folder, and only through it
    planned = make("-n", "setup", f"VENV={venv}", f"WHEELS={wheels}").splitlines()
    installs = [line for line in planned if " -m pip install " in line]
    assert len(installs) == 4 and all(f'--no-index --find-links "{wheels}"' in line for line in installs), installs

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = make("print-pip", f"VENV={venv}", f"WHEELS={wheels}").strip()
    offline = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple")  # any try at a network fails
    done = subprocess.run(f"{pip} {' '.join(SMALL)}", shell=True, cwd=ROOT, env=offline, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    subprocess.run([str(venv / "bin" / "python"), "-c", "import six, colorama"], check=True)

    missing = subprocess.run(f"{pip} tqdm", shell=True, cwd=ROOT, env=offline, capture_output=True, text=True)
    assert missing.returncode != 0 and "No matching distribution found for tqdm" in missing.stderr, missing.stderr
    assert "--no-index" not in make("print-pip")  # without WHEELS, the usual index
