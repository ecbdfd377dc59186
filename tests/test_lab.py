"""`make lab` opens the course: JupyterLab starts on notebooks/ and serves the course (headless)."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jupyterlab_serves_the_course_notebooks():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "notebooks/", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--IdentityProvider.token=", "--ServerApp.password=", "--allow-root"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, page = time.time() + 90, None
        while time.time() < deadline and page is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5).read().decode()
            except OSError:
                assert server.poll() is None, "jupyter lab exited early"
                time.sleep(1)
        assert page is not None and "JupyterLab" in page
        listing = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=10).read().decode()
        assert "00_baselines.ipynb" in listing, "the lab should open on notebooks/"
    finally:
        server.terminate()
        server.wait(timeout=30)
