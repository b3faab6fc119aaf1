"""The training code lives in `vtw_train/` at the repository root, outside the runtime package: nothing in `vtw` (or
the launcher plugin, or run.py) imports it, the wheel's package discovery leaves it out, and ``python -m vtw_train``
dispatches to one task per sub-command."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_runtime_code_never_imports_the_training_package():
    files = [*(ROOT / "vtw").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py"), ROOT / "run.py"]
    assert len(files) > 50
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if m.split(".")[0] == "vtw_train")
        for path in files
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_wheel_leaves_the_training_package_out():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    assert {"vtw", "vtw.synthvqa", "vtw.synthvideo", "vtw.methods"} <= set(packages)
    assert not [p for p in packages if p.split(".")[0] == "vtw_train"]
    assert {"vtw_train"} <= set(find_packages(str(ROOT)))  # it is a package, only excluded


def test_cli_dispatches_to_the_tasks():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vtw_train", *args], cwd=ROOT, capture_output=True, text=True)

    usage = run()
    assert usage.returncode == 2 and "python -m vtw_train {synthvqa,synthvideo}" in usage.stdout
    assert run("nonsense").returncode == 2
    video = run("synthvideo", "--help")
    assert video.returncode == 0, video.stderr
    assert "usage: python -m vtw_train synthvideo" in video.stdout and "--withdraw-min-layer" in video.stdout
    assert "--plain" not in video.stdout
