"""Expected sizes of the Dockerfile's gpu and cpu images, from the installed packages (no Docker engine here).

Each image is the base image, a virtual environment holding the lock's distributions (requirements/runtime.lock)
and TTAServe's wheel. The size of each locked distribution is what it takes installed here: the files its
RECORD lists, in this interpreter's environment, which must be the lock's (``deploy/scripts/install.sh check``).
The cpu image drops the CUDA libraries (nvidia-*, cuda-*, triton) and takes torch and torchvision from the CPU
wheel index; that index is not reachable here, so the CPU torch is measured from a CPU wheel file given with
``--cpu-torch-wheel`` (its files, uncompressed) and torchvision is counted at its installed (CUDA) size, an upper
bound. The base image's size is an input (``--base-mb``): not measurable without pulling it.

    python -m benchmarks.image_size --cpu-torch-wheel /path/to/torch-2.x.y+cpu-cp311-...whl
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import zipfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "runtime.lock"
TODAY_GB = 6.2  # the image the old Dockerfile built, as measured in issue 13
# python:3.11-slim-bookworm unpacked: Debian's slim root file system and CPython (an estimate, see the README).
BASE_MB = 125.0
MB = 1e6


def lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock", ROOT / "deploy" / "scripts" / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def installed_bytes(name: str) -> int:
    """Bytes of the files one installed distribution's RECORD lists (byte-code caches included when present)."""
    dist = importlib.metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def wheel_bytes(wheel: Path) -> int:
    """Bytes a wheel's files take once unpacked."""
    with zipfile.ZipFile(wheel) as z:
        return sum(info.file_size for info in z.infolist())


def app_bytes() -> int:
    """TTAServe's own files as its wheel installs them: server/ and adapters/, package data included."""
    return sum(
        p.stat().st_size
        for package in ("server", "adapters")
        for p in (ROOT / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def sizes(cpu_torch_wheel: Path | None, base_mb: float) -> dict[str, float]:
    """Megabytes per part of each image, and each image's total."""
    lock = lock_module()
    locked = lock.entries(LOCK.read_text())
    cuda_only = sum(installed_bytes(n) for n in locked if lock.CUDA_ONLY.match(n))
    torch_cuda = installed_bytes("torch")
    torchvision = installed_bytes("torchvision")
    common = sum(installed_bytes(n) for n in locked if not lock.CUDA_ONLY.match(n) and n not in lock.TORCH)
    venv = installed_bytes("pip")  # python -m venv puts pip in it
    app = app_bytes()
    parts = {
        "base image (estimate)": base_mb,
        "venv: pip": venv / MB,
        "common runtime dependencies": common / MB,
        "torchvision": torchvision / MB,
        "TTAServe (server, adapters, shipped models)": app / MB,
        "torch, CUDA build": torch_cuda / MB,
        "CUDA libraries (nvidia-*, cuda-*, triton)": cuda_only / MB,
    }
    shared = base_mb + (venv + common + torchvision + app) / MB
    parts["gpu image"] = shared + (torch_cuda + cuda_only) / MB
    if cpu_torch_wheel is not None:
        parts["torch, CPU build"] = wheel_bytes(cpu_torch_wheel) / MB
        parts["cpu image"] = shared + parts["torch, CPU build"]
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-torch-wheel", type=Path, help="a CPU build of torch, as a wheel file")
    parser.add_argument("--base-mb", type=float, default=BASE_MB, help="the base image's unpacked size, MB")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)
    parts = sizes(args.cpu_torch_wheel, args.base_mb)
    if args.json:
        print(json.dumps(parts))
        return
    width = max(map(len, parts))
    for name, mb in parts.items():
        versus = f"  ({mb / 1000 / TODAY_GB:.0%} of today's {TODAY_GB} GB)" if name.endswith("image") else ""
        print(f"{name:<{width}}  {mb:>8,.0f} MB{versus}")


if __name__ == "__main__":
    main()
