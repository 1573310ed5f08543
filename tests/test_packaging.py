"""``pip install .`` as a user does it: the wheel built from this checkout, installed without
the source tree into a fresh virtual environment (reusing this environment's torch and the
other dependencies, no network), runs every console script from outside the checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from opt_serving.testing.server_process import REPO

SCRIPTS = ("opt-serve", "reshard", "safe_interactive", "opt-capacity", "opt-search-server",
           "opt-demo", "opt-assets")


def _tracked_tree(dest: Path) -> Path:
    """The checkout's tracked files (as a clone has them), so the build leaves no build/ or
    egg-info in the working tree."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, out = REPO / name, dest / name
        if src.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    tree = _tracked_tree(tmp_path_factory.mktemp("src") / "opt-serving")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(dist), str(tree)], check=True,
                   capture_output=True, text=True, timeout=240)
    (whl,) = dist.glob("opt_serving-*.whl")
    return whl


def test_the_wheel_holds_every_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tracked = subprocess.run(["git", "ls-files", "*__init__.py"], cwd=REPO, text=True,
                             capture_output=True, check=True).stdout.split()
    packages = {str(Path(p).parent) for p in tracked if not p.startswith("tests/")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages left out of the wheel: {missing}"
    assert "opt_serving/decoding/scheduler.py" in names
    assert not any(n.startswith("tests/") for n in names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel in it; this environment's site-packages (torch and
    the other dependencies) reached through a .pth file, but not the checkout."""
    env = tmp_path_factory.mktemp("venv") / "v"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_deps.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True,
                   text=True, timeout=240)
    return env


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_runs_from_the_wheel(installed, script, tmp_path):
    r = subprocess.run([str(installed / "bin" / script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_llm_imports_from_the_wheel_not_the_checkout(installed, tmp_path):
    code = ("import opt_serving, opt_serving.decoding.scheduler; from opt_serving import LLM; "
            "print(opt_serving.__file__)")
    r = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    where = Path(r.stdout.strip())
    assert installed in where.parents and REPO not in where.parents
