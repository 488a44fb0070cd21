"""Device memory readings and checks, with fake readings for the CPU, CUDA and MPS paths (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

import attnseg.devices as devices
from attnseg.errors import AttnSegError
from attnseg.methods.ops import available_memory_bytes, check_memory

GiB = 2**30


@pytest.fixture()
def host_gib(tmp_path, monkeypatch):
    """Point the host reading at a fake /proc/meminfo saying ``n`` GiB are available."""

    def set_available(n: float) -> None:
        path = tmp_path / "meminfo"
        path.write_text(f"MemTotal:       99999999 kB\nMemFree:          1000 kB\nMemAvailable: {int(n * 2**20)} kB\n")
        monkeypatch.setattr(devices, "MEMINFO_PATH", str(path))

    return set_available


@pytest.fixture()
def cuda_gib(monkeypatch):
    """Fake CUDA readings: ``free`` GiB from the driver, ``reserved``/``allocated`` GiB in PyTorch's cache."""

    def set_reading(free: float, reserved: float = 0.0, allocated: float = 0.0) -> None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free * GiB), int(80 * GiB)))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved * GiB))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated * GiB))

    return set_reading


def test_host_reading_is_memavailable(host_gib):
    host_gib(3.0)
    assert available_memory_bytes() == 3 * GiB
    assert available_memory_bytes("cpu") == 3 * GiB


def test_host_reading_unknown_without_meminfo(monkeypatch, tmp_path):
    monkeypatch.setattr(devices, "MEMINFO_PATH", str(tmp_path / "missing"))
    assert available_memory_bytes("cpu") is None
    check_memory(10**15, "a petabyte")  # unknown memory: the check passes rather than guess


def test_cuda_reading_adds_the_allocators_unused_cache(cuda_gib):
    cuda_gib(free=2.0, reserved=5.0, allocated=4.0)  # 1 GiB cached but unused is reusable
    assert available_memory_bytes("cuda:0") == 3 * GiB


def test_mps_reading_is_recommended_minus_allocated(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * GiB)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 6 * GiB)
    assert available_memory_bytes("mps") == 10 * GiB


def test_mps_reading_unknown_without_the_functions(monkeypatch):
    monkeypatch.delattr(torch.mps, "recommended_max_memory")
    assert available_memory_bytes("mps") is None


def test_default_fractions():
    assert devices.default_check_fraction("cpu") == 0.5
    assert devices.default_check_fraction("cuda:0") == 0.8
    assert devices.default_check_fraction("mps") == 0.8


def test_check_reads_the_device_that_holds_the_tensors(host_gib, cuda_gib):
    """A big host must not let work through on a small card, and a small host must not refuse a big card."""
    host_gib(128.0)
    cuda_gib(free=24.0)
    need = 30 * GiB
    check_memory(need, "maps", device="cpu")  # 30 GiB <= 50% of 128 GiB
    expected = r"maps needs about 30\.0 GiB, more than 80% of the 24\.0 GiB available on cuda:0"
    with pytest.raises(AttnSegError, match=expected):
        check_memory(need, "maps", device="cuda:0")
    host_gib(8.0)
    cuda_gib(free=80.0)
    check_memory(need, "maps", device="cuda:0")  # 30 GiB <= 80% of 80 GiB
    with pytest.raises(AttnSegError, match=r"available on the host \(cpu\)"):
        check_memory(need, "maps", device="cpu")


def test_check_boundary_is_the_fraction(cuda_gib):
    cuda_gib(free=10.0)
    check_memory(8 * GiB, "maps", device="cuda:0")  # exactly 80%: allowed
    with pytest.raises(AttnSegError):
        check_memory(8 * GiB + 1, "maps", device="cuda:0")
    check_memory(9 * GiB, "maps", device="cuda:0", fraction=0.9)


def test_check_message_names_size_and_fix(host_gib):
    host_gib(1.0)
    with pytest.raises(AttnSegError) as info:
        check_memory(3 * GiB, "aggregating self-attention at 128x128", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg
    assert "3.0 GiB" in msg and "1.0 GiB" in msg and "--size" in msg


def test_resolve_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(devices, "accelerator_types", lambda: [])
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_device_name_is_a_file_name():
    assert devices.device_name("cpu") == "cpu"


def test_peak_memory_on_the_host():
    """Measured in a fresh process: in the suite's, memory that earlier tests free while the sampler runs lowers
    the resident set under its base and can hide the allocation."""
    import subprocess
    import sys

    code = (
        "import time, torch\n"
        "from attnseg import devices\n"
        "with devices.PeakMemory('cpu') as peak:\n"
        "    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "    time.sleep(0.05)  # held for about 50 samples\n"
        "    del x\n"
        "print(peak.delta)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert 32 * 2**20 <= int(out.stdout.strip().splitlines()[-1]) < 1024 * 2**20, out.stdout


def test_peak_memory_on_cuda_reads_max_memory_allocated(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1100)
    with devices.PeakMemory("cuda:0") as peak:
        pass
    assert peak.delta == 1000
    assert calls[:2] == ["sync", "reset"]


def test_device_fixture_covers_cpu_cuda_and_mps():
    """The accelerator variants exist and, where their device is absent, are skipped with a reason."""
    from tests.conftest import DEVICE_PARAMS

    ids = [p.id for p in DEVICE_PARAMS]
    assert ids == ["cpu", "cuda", "mps"]
    cuda = DEVICE_PARAMS[1]
    skip = [m for m in cuda.marks if m.name == "skipif"]
    assert skip and "CUDA" in skip[0].kwargs["reason"]
    assert bool(skip[0].args[0]) == (not torch.cuda.is_available())


def test_device_fixture(device):
    x = torch.ones(3, device=device)
    assert x.device == device
