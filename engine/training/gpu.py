"""In-process hardware readings: NVIDIA GPUs through NVML, CPU and RAM through psutil.

``GpuSampler`` initialises NVML once (``pynvml``, imported lazily) and reads every GPU
without a subprocess; when there is no NVML library, no driver or no device it says so
(``available = False``, ``reason``) and ``sample()`` returns ``[]``. ``HostSampler`` reads
psutil's CPU times and virtual memory. Neither ever raises to the caller.

NVML numbers GPUs physically (as ``nvidia-smi`` does), which can differ from the order
``CUDA_VISIBLE_DEVICES`` gives a process; pass ``indices`` (NVML indices) to read a subset, or
use ``GpuSampler.for_cuda_device(i)`` for the GPU that CUDA device ``i`` of this process is
(``CUDA_VISIBLE_DEVICES`` mapped as nvitop does: indices, ``GPU-``/``MIG-`` UUIDs or their prefixes).
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass


@dataclass
class GpuStat:
    index: int
    name: str
    util_percent: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    @property
    def mem_fraction(self) -> float | None:
        if self.mem_used_bytes is None or not self.mem_total_bytes:
            return None
        return self.mem_used_bytes / self.mem_total_bytes


@dataclass
class HostStat:
    cpu_percent: float | None = None
    ram_used_bytes: int | None = None
    ram_total_bytes: int | None = None


def _import_pynvml():
    # The "pynvml" distribution (>= 12) is a shim over nvidia-ml-py that warns on import.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pynvml  # noqa: PLC0415  (lazy: importing must never fail the engine)
    return pynvml


def cuda_to_nvml(cuda_index: int, visible: str | None, uuids: list[str]) -> int | None:
    """The NVML index of CUDA device ``cuda_index`` given ``CUDA_VISIBLE_DEVICES`` (``visible``).

    ``uuids`` are the NVML devices' UUIDs by NVML index. Like CUDA, the list is read up to its
    first entry that names no device; an empty or unset variable means every device in order.
    None when the process cannot see that many devices.
    """
    if visible is None:
        return cuda_index if 0 <= cuda_index < len(uuids) else None
    found: list[int] = []
    for token in (t.strip() for t in visible.split(",")):
        if token.lstrip("-").isdigit():
            i = int(token)
            if not 0 <= i < len(uuids):
                break
        else:
            matches = [i for i, u in enumerate(uuids) if token and u.startswith(token)]
            if len(matches) != 1:
                break
            i = matches[0]
        if i in found:
            break
        found.append(i)
    return found[cuda_index] if 0 <= cuda_index < len(found) else None


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


class GpuSampler:
    """NVML readings of the NVIDIA GPUs on this host; never raises.

    ``available``: NVML initialised and at least one device found; otherwise ``reason`` says
    why (e.g. "no NVIDIA GPU (NVML: NVML Shared Library Not Found)").
    """

    def __init__(self, indices: list[int] | None = None):
        self.available = False
        self.reason = ""
        self.driver_version: str | None = None
        self._nvml = None
        self._handles: list[tuple[int, object, str]] = []   # (index, handle, name)
        self._lock = threading.Lock()
        try:
            nvml = _import_pynvml()
        except Exception as e:  # ImportError, or anything a broken install throws
            self.reason = f"no NVIDIA GPU readings (pynvml not importable: {_short(e)})"
            return
        try:
            nvml.nvmlInit()
        except Exception as e:
            self.reason = f"no NVIDIA GPU (NVML: {_short(e)})"
            return
        self._nvml = nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as e:
            self.reason = f"no NVIDIA GPU (NVML device count: {_short(e)})"
            self.close()
            return
        try:
            v = nvml.nvmlSystemGetDriverVersion()
            self.driver_version = v.decode() if isinstance(v, bytes) else str(v)
        except Exception:
            pass
        wanted = range(count) if indices is None else [i for i in indices if 0 <= i < count]
        errors = []
        for i in wanted:
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception as e:
                errors.append(f"GPU {i}: {_short(e)}")
                continue
            try:
                name = nvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                name = f"GPU {i}"
            self._handles.append((i, h, name))
        if not self._handles:
            if count == 0:
                self.reason = "no NVIDIA GPU (NVML found 0 devices)"
            elif errors:
                self.reason = "no readable NVIDIA GPU (NVML: " + "; ".join(errors) + ")"
            else:
                self.reason = f"none of GPUs {list(indices or [])} exist (NVML found {count})"
            self.close()
            return
        self.available = True

    @classmethod
    def for_cuda_device(cls, cuda_index: int, visible: str | None = None) -> "GpuSampler":
        """A sampler of the one GPU that this process calls ``cuda:{cuda_index}``.

        ``visible`` defaults to this process's ``CUDA_VISIBLE_DEVICES``.
        """
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        probe = cls()
        uuids = probe.uuids()
        probe.close()
        if not uuids:
            return probe                      # unavailable: keeps the reason
        nvml_index = cuda_to_nvml(cuda_index, visible, uuids)
        if nvml_index is None:
            probe.reason = f"CUDA device {cuda_index} is not visible (CUDA_VISIBLE_DEVICES={visible!r})"
            return probe
        return cls(indices=[nvml_index])

    def uuids(self) -> list[str]:
        """The UUIDs of the opened GPUs, in NVML order ("" where NVML cannot say)."""
        with self._lock:
            if self._nvml is None:
                return []
            out = []
            for _, h, _ in self._handles:
                u = self._read(self._nvml.nvmlDeviceGetUUID, h)
                out.append(u.decode() if isinstance(u, bytes) else (u or ""))
            return out

    @property
    def count(self) -> int:
        return len(self._handles)

    def _read(self, fn, *args):
        try:
            return fn(*args)
        except Exception:
            return None

    def sample(self) -> list[GpuStat]:
        """One reading per GPU; a value NVML cannot give is None. [] when unavailable."""
        with self._lock:
            if not self.available or self._nvml is None:
                return []
            nvml = self._nvml
            out = []
            for i, h, name in self._handles:
                util = self._read(nvml.nvmlDeviceGetUtilizationRates, h)
                mem = self._read(nvml.nvmlDeviceGetMemoryInfo, h)
                temp = self._read(nvml.nvmlDeviceGetTemperature, h, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
                power = self._read(nvml.nvmlDeviceGetPowerUsage, h)            # milliwatts
                limit = self._read(nvml.nvmlDeviceGetEnforcedPowerLimit, h)    # milliwatts
                if limit is None:
                    limit = self._read(nvml.nvmlDeviceGetPowerManagementLimit, h)
                out.append(GpuStat(
                    index=i, name=name,
                    util_percent=float(util.gpu) if util is not None else None,
                    mem_used_bytes=int(mem.used) if mem is not None else None,
                    mem_total_bytes=int(mem.total) if mem is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power / 1000.0 if power is not None else None,
                    power_limit_w=limit / 1000.0 if limit is not None else None,
                ))
            return out

    def close(self) -> None:
        """Shut NVML down (once); later ``sample()`` calls return []."""
        with self._lock:
            nvml, self._nvml = self._nvml, None
            self.available = False
            self._handles = []
            if nvml is not None:
                try:
                    nvml.nvmlShutdown()
                except Exception:
                    pass
            if not self.reason:
                self.reason = "closed"

    def __enter__(self) -> "GpuSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cpu_busy_total(cpu_times) -> tuple[float, float] | None:
    """(busy, total) CPU seconds of all cores from ``psutil.cpu_times()``-like readings."""
    try:
        t = cpu_times()
    except Exception:  # noqa: BLE001 - no reading: the field stays None
        return None
    total = float(sum(t))
    # guest time is already counted in user/nice (as in /proc/stat); idle and iowait are not busy
    for extra in ("guest", "guest_nice"):
        total -= float(getattr(t, extra, 0.0) or 0.0)
    idle = float(getattr(t, "idle", 0.0)) + float(getattr(t, "iowait", 0.0) or 0.0)
    return total - idle, total


class HostSampler:
    """CPU and RAM of this host (psutil); CPU % is measured between successive samples.

    The first ``sample()`` measures since the sampler was made; if no time has passed it
    falls back to the average since boot. Where psutil cannot read them the fields are None.
    ``cpu_times`` / ``virtual_memory``: the readings (psutil's functions by default).
    """

    def __init__(self, cpu_times=None, virtual_memory=None):
        import psutil
        self._cpu_times = cpu_times or psutil.cpu_times
        self._virtual_memory = virtual_memory or psutil.virtual_memory
        self._prev = _cpu_busy_total(self._cpu_times)
        self._lock = threading.Lock()

    def sample(self) -> HostStat:
        with self._lock:
            cur = _cpu_busy_total(self._cpu_times)
            cpu = None
            if cur is not None:
                prev = self._prev
                if prev is not None and cur[1] > prev[1]:
                    busy, total = cur[0] - prev[0], cur[1] - prev[1]
                else:
                    busy, total = cur
                if total > 0:
                    cpu = max(0.0, min(100.0, 100.0 * busy / total))
                self._prev = cur
            try:
                vm = self._virtual_memory()
                total_ram = int(vm.total)
                used = max(0, min(total_ram, total_ram - int(vm.available)))
            except Exception:  # noqa: BLE001
                used = total_ram = None
            return HostStat(cpu_percent=cpu, ram_used_bytes=used, ram_total_bytes=total_ram)
