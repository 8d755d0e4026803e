"""The README's two commands are the ones CI and a new user run."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (REPO / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_the_install_and_test_commands():
    install, test = _readme_commands()[:2]
    assert "pip install" in install and "dslocal " in install
    assert test.startswith('pip install ".[test]" && ')


def test_ci_runs_the_readme_test_command():
    test = _readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert 'python -m pip install -q ".[test]"' in ci
    assert test.split(" && ", 1)[1] == ci[-1]
