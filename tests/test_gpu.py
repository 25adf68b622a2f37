"""Hardware readings: NVML through the real pynvml (no mocks), CPU/RAM from /proc.

Without an NVIDIA GPU (the CI machine) the sampler must say so with a reason and return [];
on a machine with one (the lent H200) the same tests check that the readings are sane.
"""
from __future__ import annotations

import glob
import os
import time

import pytest

from engine.training.gpu import GpuSampler, GpuStat, HostSampler, HostStat


def has_nvidia_device() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def test_gpu_sampler_reports_availability_without_raising():
    s = GpuSampler()
    try:
        if not has_nvidia_device():
            assert s.available is False
            assert s.reason.startswith("no NVIDIA GPU")
            assert "NVML" in s.reason or "pynvml" in s.reason
            assert s.sample() == []
            assert s.count == 0
        else:
            assert s.available, s.reason
            stats = s.sample()
            assert len(stats) == s.count >= 1
            for g in stats:
                assert isinstance(g, GpuStat) and g.name
                assert g.util_percent is None or 0 <= g.util_percent <= 100
                if g.mem_total_bytes is not None:
                    assert 0 < g.mem_total_bytes and 0 <= g.mem_used_bytes <= g.mem_total_bytes
                assert g.temperature_c is None or 0 < g.temperature_c < 130
                if g.power_w is not None and g.power_limit_w is not None:
                    assert 0 < g.power_w <= 1.5 * g.power_limit_w
            assert [g.index for g in stats] == sorted(g.index for g in stats)
    finally:
        s.close()


def test_gpu_sampler_close_is_idempotent_and_sample_after_close_is_empty():
    s = GpuSampler()
    s.close()
    s.close()
    assert s.available is False and s.reason
    assert s.sample() == []


def test_gpu_sampler_indices_out_of_range_is_unavailable():
    with GpuSampler(indices=[999]) as s:
        assert s.available is False and s.reason
        assert s.sample() == []


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_host_sampler_returns_sane_numbers():
    h = HostSampler()
    first = h.sample()   # immediately after construction: falls back to the since-boot average
    assert isinstance(first, HostStat)
    assert first.cpu_percent is not None and 0.0 <= first.cpu_percent <= 100.0
    end = time.time() + 0.3
    while time.time() < end:   # keep a core busy so the interval has some CPU time in it
        sum(range(10_000))
    second = h.sample()
    assert 0.0 <= second.cpu_percent <= 100.0
    assert second.cpu_percent > 0.0
    assert second.ram_total_bytes > 0
    assert 0 < second.ram_used_bytes <= second.ram_total_bytes
    # /proc/meminfo's MemTotal is the same figure os.sysconf reports
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(second.ram_total_bytes - pages) <= 0.01 * pages


def test_host_sampler_without_proc_gives_none(tmp_path):
    h = HostSampler(stat_path=str(tmp_path / "nope"), meminfo_path=str(tmp_path / "nope2"))
    st = h.sample()
    assert st == HostStat(cpu_percent=None, ram_used_bytes=None, ram_total_bytes=None)


def test_host_sampler_cpu_percent_from_counters(tmp_path):
    stat = tmp_path / "stat"
    mem = tmp_path / "meminfo"
    mem.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n")
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n")
    h = HostSampler(stat_path=str(stat), meminfo_path=str(mem))
    # +300 busy, +100 idle, +0 iowait since the first read: 75 %
    stat.write_text("cpu  300 0 200 800 100 0 0 0 0 0\n")
    st = h.sample()
    assert st.cpu_percent == pytest.approx(75.0)
    assert st.ram_total_bytes == 1000 * 1024 and st.ram_used_bytes == 600 * 1024


UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-cccc3333", "GPU-dddd4444"]


@pytest.mark.parametrize("visible, cuda_index, nvml_index", [
    (None, 0, 0), (None, 3, 3), (None, 4, None),
    ("3", 0, 3),                        # the run's only GPU is physical GPU 3, not NVML 0
    ("2,3", 1, 3), ("3,1", 1, 1),
    ("GPU-cccc", 0, 2),                 # a UUID prefix, as CUDA accepts
    ("1,GPU-dddd4444", 1, 3),
    ("1,7,2", 1, None),                 # CUDA stops at the first entry that names no device
    ("1,GPU-nope,2", 1, None),
    ("", 0, None),                      # set but empty: no GPU at all
    ("0,0", 1, None),                   # a repeated device ends the list
])
def test_cuda_device_maps_to_nvml_index_through_cuda_visible_devices(visible, cuda_index, nvml_index):
    from engine.training.gpu import cuda_to_nvml
    assert cuda_to_nvml(cuda_index, visible, UUIDS) == nvml_index


def test_gpu_watcher_of_a_run_samples_the_gpu_cuda_visible_devices_names(monkeypatch):
    """The low-GPU-use hint reads the run's own GPU: CUDA_VISIBLE_DEVICES=3 is NVML GPU 3."""
    from engine.training import gpu
    opened = []

    def fake_init(self, indices=None):          # NVML itself is absent on CI: record what is opened
        opened.append(indices)
        self.available, self.reason, self._nvml, self._handles = False, "", None, []
        self._lock = __import__("threading").Lock()

    monkeypatch.setattr(gpu.GpuSampler, "__init__", fake_init)
    monkeypatch.setattr(gpu.GpuSampler, "uuids", lambda self: UUIDS)
    monkeypatch.setattr(gpu.GpuSampler, "close", lambda self: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    from engine.training.distributed import local_rank
    gpu.GpuSampler.for_cuda_device(local_rank())
    assert opened[-1] == [3]
