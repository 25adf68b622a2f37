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
    # psutil's total RAM is the same figure os.sysconf reports
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(second.ram_total_bytes - pages) <= 0.01 * pages


def test_host_sampler_without_readings_gives_none():
    def broken():
        raise OSError("no readings here")
    h = HostSampler(cpu_times=broken, virtual_memory=broken)
    st = h.sample()
    assert st == HostStat(cpu_percent=None, ram_used_bytes=None, ram_total_bytes=None)


def test_host_sampler_cpu_percent_from_counters():
    from collections import namedtuple
    Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")
    Mem = namedtuple("Mem", "total available")
    readings = [Times(100, 0, 100, 700, 100, 0, 0, 0, 50, 0)]     # guest time is inside user already
    h = HostSampler(cpu_times=lambda: readings[-1], virtual_memory=lambda: Mem(1000 * 1024, 400 * 1024))
    # +300 busy, +100 idle, +0 iowait since the first read: 75 %
    readings.append(Times(300, 0, 200, 800, 100, 0, 0, 0, 60, 0))
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


# --------------------------------------------------------------------------- run liveness (psutil)

def test_process_alive_is_pid_and_start_time(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    import psutil
    from engine.core import rundir
    rundir.write_pid(tmp_path)                                   # this process
    info = json.loads((tmp_path / rundir.RUN_JSON).read_text())
    assert info["create_time"] == psutil.Process().create_time()
    ticks = round((psutil.Process().create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
    assert abs(info["start_ticks"] - ticks) <= 1                 # the kernel's count, since boot
    assert rundir.process_alive(tmp_path)
    # the same pid with another start: a reused pid, not our run
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps({**info, "start_ticks": info["start_ticks"] - 500}))
    assert not rundir.process_alive(tmp_path)
    # the wall clock set while the run trains (NTP, a VM resumed): psutil's create_time moves with
    # it, the start in ticks does not, and the live run stays live
    real_boot = psutil.boot_time()
    monkeypatch.setattr(psutil._psplatform, "boot_time", lambda: real_boot + 7.0)
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps(info))
    assert abs(psutil.Process().create_time() - info["create_time"]) > 1
    assert rundir.process_alive(tmp_path)
    monkeypatch.undo()
    # run.json without ticks (another OS, an older version): create_time
    by_time = {k: v for k, v in info.items() if k != "start_ticks"}
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps(by_time))
    assert rundir.process_alive(tmp_path)
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps({**by_time, "create_time": info["create_time"] - 5}))
    assert not rundir.process_alive(tmp_path)
    # a process that has exited
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rundir.write_pid(tmp_path, child.pid)
    assert not rundir.process_alive(tmp_path)


def test_a_detached_child_handed_the_lock_does_not_wait_for_itself(tmp_path, monkeypatch):
    """The child of a detached resume holds the lock its parent took (and waited for): its own
    check for a writer still exiting must not find that lock and wait a minute on itself."""
    from engine.core import events, rundir
    w = events.JsonlWriter(tmp_path / rundir.EVENTS)     # a run that has ended (out of memory)
    w(events.RunStarted(model="builtin:tiny", total_steps=6))
    w(events.RunFailed(reason="out of memory", kind="oom", step=4))
    w.close()
    fd = rundir.acquire_lock(tmp_path)           # as start_detached does, before the child starts
    try:
        rundir.write_pid(tmp_path, os.getppid())     # run.json: a process other than this one
        class Waited(Exception):
            pass

        def sleep(s):
            slept.append(s)
            raise Waited
        slept = []
        monkeypatch.setattr(rundir.time, "sleep", sleep)
        with pytest.raises(Waited):              # not handed the lock: the held lock is waited for
            rundir.wait_writer_exit(tmp_path, timeout=5)
        monkeypatch.setenv(rundir.LOCK_FD_ENV, str(fd))
        rundir.wait_writer_exit(tmp_path, timeout=5)
        assert len(slept) == 1
    finally:
        os.close(fd)
