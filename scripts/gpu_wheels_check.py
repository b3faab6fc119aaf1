"""Checks of the wheel folder that ``scripts/gpu_wheels.sh`` builds for the GPU machine's image.

``python scripts/gpu_wheels_check.py requires TARGET``
    TARGET: the wheels installed with ``pip install --no-deps --target`` for CPython 3.12 manylinux. Every
    Requires-Dist of every installed distribution (markers evaluated for CPython 3.12 on Linux x86_64, no extras) is
    looked up in the set itself, then in the image (:data:`IMAGE`, with the notes' versions), then in what the image's
    packages pull in (:func:`image_closure`). A version that does not fit is an error (exit 1); a requirement found
    nowhere is listed as "declared, absent": lmms-eval declares ~50 packages its vtw path never imports, so whether
    the run path needs one is for ``simulate`` to show.

``python scripts/gpu_wheels_check.py simulate DIR [WHL]``
    Makes DIR a venv (this Python) holding only the image's packages, what they pull in, and the set in WHL (default
    ``.whl``), each at the version installed in this interpreter (the lock's: the set's cp312 wheels cannot load on
    3.11), so that ``DIR/bin/python run.py ... logger=none`` shows whether the run path imports anything else
    (a ModuleNotFoundError names it).

Run both with the lock's venv (``.venv/bin/python``): the image's dependency closure is read from its metadata.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

# The GPU machine's image (/work/shared/notes/gpu-device.md): package -> version (None: version not given).
IMAGE = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "numpy": "2.5",
    "pandas": None,
    "pyarrow": None,
    "matplotlib": None,
    "rich": None,
    "tqdm": None,
    "pillow": None,
    "setuptools": None,
    "httpx": None,  # not named: what the image's huggingface-hub 1.33 requires (the lock's 2.4 requires httpx2)
}
# Said to be absent from the image (so never counted as pulled in by its packages).
IMAGE_LACKS = frozenset(
    canonicalize_name(n)
    for n in """lmms-eval hydra-core omegaconf antlr4-python3-runtime wandb datasets evaluate dill multiprocess loguru
    numexpr python-dotenv zstandard chardet defusedxml truststore httpx2 httpcore2 wcwidth sniffio pytz submitit
    hydra-submitit-launcher av""".split()
)
TARGET_ENV = {  # CPython 3.12 on Linux x86_64, for environment markers
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def requirements(dist: metadata.Distribution, env: dict | None = None) -> list[Requirement]:
    """``dist``'s Requires-Dist that apply without extras (markers evaluated in ``env``; None: this interpreter)."""
    out = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**(env or {}), "extra": ""}):
            out.append(req)
    return out


def image_closure() -> dict[str, str | None]:
    """The image's packages and, recursively, what they require (per this interpreter's installed metadata, less
    :data:`IMAGE_LACKS`): ``{name: version}``, the notes' version for the image's own, else None."""
    found = {canonicalize_name(n): v for n, v in IMAGE.items()}
    todo = list(found)
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:
            continue
        for req in requirements(dist):
            name = canonicalize_name(req.name)
            if name not in found and name not in IMAGE_LACKS:
                found[name] = None
                todo.append(name)
    return found


def check_requires(target: Path) -> int:
    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=[str(target)])}
    image = image_closure()
    implied = sorted(set(image) - {canonicalize_name(n) for n in IMAGE})
    print(f"set: {len(dists)} distributions; image: {len(IMAGE)} named + {len(implied)} pulled in: {' '.join(implied)}")
    errors, absent = [], {}
    for name, dist in sorted(dists.items()):
        for req in requirements(dist, TARGET_ENV):
            dep = canonicalize_name(req.name)
            if dep in dists:
                have, where = dists[dep].version, "set"
            elif dep in image:
                have, where = image[dep], "image"
            else:
                absent.setdefault(dep, []).append(name)
                continue
            if have is not None and not SpecifierSet(str(req.specifier)).contains(have, prereleases=True):
                errors.append(f"{name} requires {req} but the {where} has {dep} {have}")
    for dep, by in sorted(absent.items()):
        print(f"declared, absent: {dep} (by {', '.join(sorted(set(by)))})")
    for e in errors:
        print(f"ERROR: {e}")
    print(f"requires: {len(errors)} version conflicts, {len(absent)} declared but absent")
    return 1 if errors else 0


def simulate(env_dir: Path, whl: Path) -> int:
    """A venv holding only the image closure and the set (see the module docstring)."""
    here = set(tags.sys_tags())
    wheels = {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in whl.glob("*.whl")}
    usable = sorted(str(w) for w in wheels.values() if here & parse_wheel_filename(w.name)[3])
    venv.create(env_dir, clear=True, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    # the set's pure-Python wheels (vtw's dist-info included) as they are; the rest from this interpreter
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--target"]
    subprocess.run([*pip, str(site), *usable], check=True)
    linked, missing = {p.name for p in site.iterdir()}, []
    names = set(image_closure()) | set(wheels)
    for name in sorted(names - {canonicalize_name(parse_wheel_filename(Path(w).name)[0]) for w in usable}):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        root = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")} - linked:
            if (root / top).exists():
                (site / top).symlink_to(root / top)
                linked.add(top)
    repo = Path(__file__).resolve().parents[1]
    (site / "vtw_repo.pth").write_text(f"{repo}\n")  # vtw's code: the tree, as PYTHONPATH=$PWD on the device
    print(f"{env_dir}: {len(usable)} wheels installed, {len(names) - len(usable) - len(missing)} distributions linked"
          f" from {sys.prefix}; not installed there: {' '.join(missing) or 'none'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:] or ["--help"]
    if cmd == "requires" and len(args) == 1:
        sys.exit(check_requires(Path(args[0])))
    if cmd == "simulate" and len(args) in (1, 2):
        sys.exit(simulate(Path(args[0]), Path(args[1] if len(args) == 2 else ".whl")))
    sys.exit(__doc__)
