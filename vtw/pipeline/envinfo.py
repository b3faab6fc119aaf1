"""Provenance recorded in every ``results.json``: git commit of the code, package versions, and whether the
environment is the locked set of ``requirements.lock`` (``scripts/install.sh`` installs it; ``scripts/lock.sh``
refreshes it)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("vtw", "torch", "transformers", "lmms_eval", "hydra-core", "omegaconf", "wandb", "accelerate", "datasets")
REPO_DIR = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_DIR / "requirements.lock"


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


def _locked_pins(text: str) -> dict[str, str]:
    """``{normalized name: version}`` of the lock lines whose environment marker holds here.

    ``text``: a requirements file of exact pins, ``name==version`` with an optional ``; marker`` (what
    ``uv pip compile`` writes); comments, blank lines and option lines are skipped.
    """
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req, _, marker = line.partition(";")
        name, sep, version = req.strip().partition("==")
        if not sep:
            raise ValueError(f"lock line {raw!r} is not an exact pin name==version")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def lock_status(lock: str | Path = LOCK_FILE) -> dict:
    """Is this environment the locked set? Recorded in ``results.json`` as ``lock``.

    Returns ``{"file", "sha256", "locked", "packages", "mismatches"}``: ``locked`` is True when every package the
    lock pins for this interpreter and platform is installed at exactly that version (``packages`` of them; a local
    build tag such as ``+cu130`` is allowed, as pip's ``==`` allows it); ``mismatches`` maps each other one to
    ``{"locked": v, "installed": v | None}``. Packages installed beside the lock do not count. Without a lock file
    (vtw installed from a wheel into someone's own environment) ``file``/``sha256`` are ``None`` and ``locked`` False.
    """
    from packaging.specifiers import SpecifierSet

    lock = Path(lock)
    if not lock.is_file():
        return {"file": None, "sha256": None, "locked": False, "packages": 0, "mismatches": {}}
    data = lock.read_bytes()
    pins = _locked_pins(data.decode())
    mismatches = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not SpecifierSet(f"=={version}").contains(installed, prereleases=True):
            mismatches[name] = {"locked": version, "installed": installed}
    return {
        "file": str(lock),
        "sha256": hashlib.sha256(data).hexdigest(),
        "locked": not mismatches,
        "packages": len(pins),
        "mismatches": mismatches,
    }
