"""The package installs the way people install tools: a wheel into a fresh venv, then the console script works.

The wheel is built offline (``--no-build-isolation``: hatchling comes with the dev extra) and installed with
``--no-deps`` into a new venv that reuses this environment's packages (torch and the rest) through a ``.pth`` line,
so nothing is downloaded. This environment's own editable install is not seen there: a path a ``.pth`` file adds is
not scanned for further ``.pth`` files. The call runs on the demo model, whose checkpoint must ship in the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str | Path, cwd: Path) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the venv installed
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300, env=environment, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_on_the_demo_model(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the dev extra's hatchling builds the wheel offline")
    wheels = tmp_path / "wheels"
    _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        wheels,
        ROOT,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("nextchat_mcp-*.whl")

    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "reuse_installed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    where = _run(
        python, "-c", "import nextchat, mcp_server; print(nextchat.__file__, mcp_server.__file__)", cwd=tmp_path
    )
    assert all(path.startswith(str(site)) for path in where.split()), where
    assert (site / "nextchat" / "demo" / "checkpoint" / "model.safetensors").is_file()

    script = target / "bin" / "nextchat-mcp"
    assert "locate_objects" in _run(script, "--help", cwd=tmp_path)
    status = json.loads(_run(script, "call", "status", "--cpu-threads", "1", cwd=tmp_path))
    assert "demo" in json.dumps(status).lower()
