"""The runtime lock file (requirements/runtime.lock), read with the standard library only: install.sh runs it
before anything is installed.

    python lock.py cpu LOCK            the lock without torch, torchvision and the CUDA libraries, on stdout:
                                       the CPU image installs those from the CPU wheel index instead
    python lock.py pin LOCK NAME       NAME==VERSION as the lock pins it
    python lock.py only LOCK NAME...   the lock's entries for NAME... alone (with their hashes), on stdout
    python lock.py check LOCK [--cpu]  exit 1 unless this interpreter's installed distributions are the lock's
                                       versions (with --cpu: torch and torchvision a CPU build of them, and no
                                       CUDA library required)
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

# A lock entry: "name==version \" then its hashes, then "# via" comments.
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
# What only the CUDA build of torch needs; the CPU wheels of torch and torchvision come from their own index.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
TORCH = ("torch", "torchvision")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(text: str) -> dict[str, str]:
    return {normalize(name): version for name, version in ENTRY.findall(text)}


def blocks(text: str) -> list[tuple[str | None, str]]:
    """The lock cut into (name, block) pieces; a block is an entry with its hash and comment lines."""
    out: list[tuple[str | None, str]] = []
    for line in text.splitlines(keepends=True):
        match = ENTRY.match(line)
        if match:
            out.append((normalize(match.group(1)), line))
        elif out and (line.startswith((" ", "\t")) or not line.strip()):
            name, block = out[-1]
            out[-1] = (name, block + line)
        else:
            out.append((None, line))
    return out


def without_cuda(text: str) -> str:
    return "".join(
        block for name, block in blocks(text) if name is None or not (name in TORCH or CUDA_ONLY.match(name))
    )


def only(text: str, names: list[str]) -> str:
    wanted = {normalize(n) for n in names}
    return "".join(block for name, block in blocks(text) if name in wanted)


def check(text: str, cpu: bool) -> list[str]:
    problems = []
    for name, version in entries(text).items():
        if cpu and CUDA_ONLY.match(name):
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: the lock pins {version}, none is installed")
            continue
        public, _, local = installed.partition("+")
        if public != version or (cpu and name in TORCH and local != "cpu") or (not cpu and installed != version):
            problems.append(
                f"{name}: the lock pins {version}{'+cpu' if cpu and name in TORCH else ''}, {installed} is installed"
            )
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("cpu", "pin", "only", "check"):
        sys.stderr.write(__doc__ or "")
        return 2
    text = Path(argv[1]).read_text()
    if argv[0] == "cpu":
        sys.stdout.write(without_cuda(text))
        return 0
    if argv[0] == "only":
        sys.stdout.write(only(text, argv[2:]))
        return 0
    if argv[0] == "pin":
        name = normalize(argv[2])
        sys.stdout.write(f"{name}=={entries(text)[name]}\n")
        return 0
    problems = check(text, cpu="--cpu" in argv[2:])
    for problem in problems:
        sys.stderr.write(f"lock mismatch: {problem}\n")
    if not problems:
        sys.stdout.write(f"{len(entries(text))} locked distributions match what is installed\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
