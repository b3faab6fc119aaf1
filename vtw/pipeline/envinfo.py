"""Provenance recorded in every ``results.json``: git commit of the code, package versions."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("vtw", "torch", "transformers", "lmms_eval", "hydra-core", "omegaconf", "wandb", "accelerate", "datasets")
REPO_DIR = Path(__file__).resolve().parents[2]


def git_info(repo: str | Path = REPO_DIR) -> dict:
    """``{"commit": sha | None, "dirty": bool | None}`` of the repository holding vtw (``None`` outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(packages=PACKAGES) -> dict:
    """Installed versions of the packages that determine results (``None`` when not installed), and Python's."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
