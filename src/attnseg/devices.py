"""Devices: which ones are present, how much memory is free on one, and the peak memory of a piece of work.

Memory is always read from the device that will hold the tensors (:func:`available_memory_bytes`):

- ``cpu``: the host's ``MemAvailable`` (Linux ``/proc/meminfo``); unknown (None) elsewhere.
- ``cuda``: ``torch.cuda.mem_get_info`` (free memory the driver reports) plus the blocks PyTorch's caching
  allocator holds but does not use (``memory_reserved - memory_allocated``), which it hands out again before
  asking the driver.
- ``mps``: ``torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()`` (Metal's recommended
  working set minus what this process holds). Where a PyTorch build lacks these functions the reading is unknown.
- any other device type: ``torch.<type>.mem_get_info`` where the backend has one (e.g. ``xpu``), else unknown.

An unknown reading (None) lets every check pass: refusing work on a guess would be worse than the error
the backend itself gives.

:class:`PeakMemory` measures the peak memory of a block of code on a device: ``torch.cuda.max_memory_allocated``
on CUDA, sampled allocations on MPS, sampled resident-set size on the CPU. The benchmarks use it.

Example:
    >>> from attnseg.devices import available_memory_bytes
    >>> available_memory_bytes("cpu") is None or available_memory_bytes("cpu") > 0
    True
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "MEMINFO_PATH",
    "PeakMemory",
    "accelerator_types",
    "as_device",
    "available_memory_bytes",
    "default_check_fraction",
    "describe_device",
    "device_name",
    "resolve_device",
    "synchronize",
]

#: Where the host's memory reading comes from (a module attribute so that tests can point it elsewhere).
MEMINFO_PATH = "/proc/meminfo"

#: Share of the available memory a size check lets one piece of work take, per device type. The host is shared
#: with the OS, other processes and transient copies; an accelerator's memory is this process's, and the estimate
#: leaves the rest for the model's own activations and allocator fragmentation.
_CHECK_FRACTION = {"cpu": 0.5}
_ACCELERATOR_FRACTION = 0.8


def as_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: the CPU); ``"cuda"`` without an index means the current CUDA device."""
    import torch

    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def accelerator_types() -> list[str]:
    """Accelerator device types usable in this process, in order of preference (``"cuda"``, ``"mps"``)."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first accelerator present (CUDA, then MPS), else the CPU; anything else as given."""
    if str(device) == "auto":
        found = accelerator_types()
        return as_device(found[0] if found else "cpu")
    return as_device(device)


def device_name(device: torch.device | str) -> str:
    """A short name for results files: ``"cpu"``, the GPU's name in lower case with dashes (``"nvidia-h200"``)."""
    import re

    import torch

    dev = as_device(device)
    if dev.type == "cuda":
        raw = torch.cuda.get_device_name(dev)
    elif dev.type == "mps":
        raw = "mps"
    else:
        raw = dev.type
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-") or dev.type


def describe_device(device: torch.device | str) -> str:
    """A human-readable description for messages: ``"the host (cpu)"``, ``"cuda:0 (NVIDIA H200)"``."""
    import torch

    dev = as_device(device)
    if dev.type == "cpu":
        return "the host (cpu)"
    if dev.type == "cuda" and torch.cuda.is_available():
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def default_check_fraction(device: torch.device | str | None) -> float:
    """The share of the available memory one piece of work may take on ``device`` (0.5 host, 0.8 accelerators)."""
    return _CHECK_FRACTION.get(as_device(device).type, _ACCELERATOR_FRACTION)


def _host_available() -> int | None:
    try:
        with open(MEMINFO_PATH) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cuda_available(dev: torch.device) -> int | None:
    import torch

    free, _total = torch.cuda.mem_get_info(dev)
    cached = int(torch.cuda.memory_reserved(dev)) - int(torch.cuda.memory_allocated(dev))
    return int(free) + max(cached, 0)


def _mps_available() -> int | None:
    import torch

    mps = getattr(torch, "mps", None)
    recommended = getattr(mps, "recommended_max_memory", None)
    allocated = getattr(mps, "driver_allocated_memory", None)
    if recommended is None or allocated is None:
        return None
    return max(int(recommended()) - int(allocated()), 0)


def _other_available(dev: torch.device) -> int | None:
    import torch

    backend = getattr(torch, dev.type, None)
    reader = getattr(backend, "mem_get_info", None)
    if reader is None:
        return None
    free, _total = reader(dev)
    return int(free)


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes free now on ``device`` (None: the host), or None where that cannot be read (see the module docstring)."""
    dev = as_device(device)
    try:
        if dev.type == "cpu":
            return _host_available()
        if dev.type == "cuda":
            return _cuda_available(dev)
        if dev.type == "mps":
            return _mps_available()
        return _other_available(dev)
    except (RuntimeError, AssertionError, AttributeError, ValueError):  # backend not built in or not initialised
        return None


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU), so that wall-clock timings are honest."""
    import torch

    dev = as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Context manager: the peak memory a block of code adds on a device, in bytes (:attr:`delta`).

    - CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, then ``max_memory_allocated - memory_allocated at
      entry`` (tensors only; the caching allocator's reserve is not counted). Exact.
    - MPS: ``torch.mps.current_allocated_memory`` sampled every millisecond (approximate: a short-lived peak can
      fall between samples).
    - CPU: the resident-set size sampled every millisecond (approximate, and it counts everything the process
      allocates, not only tensors).

    Args:
        device: where the work runs.
        interval: sampling period in seconds (MPS and CPU).

    Example:
        >>> import torch
        >>> with PeakMemory("cpu") as peak:
        ...     x = torch.ones(2**20)
        >>> peak.delta >= 0
        True
    """

    def __init__(self, device: torch.device | str | None = None, *, interval: float = 0.001) -> None:
        self.device = as_device(device)
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> int:
        import torch

        if self.device.type == "mps":
            return int(torch.mps.current_allocated_memory())
        return _rss_bytes()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        import torch

        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = int(torch.cuda.memory_allocated(self.device))
            return self
        self.base = self.peak = self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._sample())

    @property
    def delta(self) -> int:
        """Peak minus the level at entry, in bytes (>= 0)."""
        return max(self.peak - self.base, 0)
