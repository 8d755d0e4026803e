"""A non-editable install into a fresh virtual environment runs from outside the source tree."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fresh_install_runs_info(tmp_path):
    # The fresh environment sees this one's packages (torch, numpy...) but gets its own dslocal, built from
    # the source tree as a wheel, so a module or data file left out of the package fails here.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("dslocal-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
                    str(wheel)], check=True, cwd=tmp_path)
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # After the install, this environment's packages are added behind the fresh one's own (a path line:
    # the .pth files there are not run, so its own dslocal, editable or not, stays out of sight).
    Path(own, "outer-env.pth").write_text("\n".join(sorted({sysconfig.get_paths()["purelib"],
                                                             sysconfig.get_paths()["platlib"]})) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import dslocal.quant.gguf_file as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert str(venv) in where, where

    dslocal = str(venv / "bin" / "dslocal")
    r = subprocess.run([dslocal, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "info" in r.stdout and "synth" in r.stdout, r.stderr
    r = subprocess.run([dslocal, "synth", "m.gguf", "--preset", "tiny-v3", "--type", "q4_k_m"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([dslocal, "info", "m.gguf"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and "deepseek2" in r.stdout and "routed experts read" in r.stdout, r.stderr
    r = subprocess.run([dslocal, "run", "--gguf", "m.gguf", "--prompt", "Hello", "--max-tokens", "4",
                        "--temperature", "0"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # no --gguf: the bundled model, which must be inside the wheel
    r = subprocess.run([dslocal, "run", "--prompt", "What is 23 + 45?", "--temperature", "0"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "23 + 45 = 68.", (r.stdout, r.stderr)
