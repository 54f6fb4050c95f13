"""Peak memory of a setup: a Linux process's resident set, this process's CUDA allocations, a server's GPU memory."""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
from pathlib import Path

import torch


class ProcessPeak:
    """Peak resident memory of a Linux process since ``reset`` (VmHWM), in MiB; None where unreadable."""

    def __init__(self, pid: int | str = "self"):
        self.pid = pid

    def reset(self) -> None:
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS

    def peak_mib(self) -> float | None:
        try:
            match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) / 1024 if match else None


class CudaPeak:
    """Peak of this process's allocated CUDA memory since ``reset``, and how far it rose above the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def rise_mib(self) -> float:
        return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20


class SmiPeak:
    """The server's GPU memory as nvidia-smi reports it (allocator reserve included), polled every 50 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start: float | None = None
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0] == str(self.pid):
                return float(parts[1])
        return None

    def __enter__(self) -> SmiPeak:
        self.start = self.peak = self._read()

        def poll() -> None:
            while not self._stop.wait(0.05):
                value = self._read()
                if value is not None:
                    self.peak = max(self.peak or 0.0, value)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
