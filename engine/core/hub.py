"""The network, only where the user asked for it.

- Code: nothing downloads and runs a compiled kernel from the Hub. bitsandbytes (0.50+) asks the
  ``kernels`` package for one when it is imported on some CPUs, and transformers can swap layers
  for Hub kernels; ``install()`` (run when ``engine`` is imported) disarms the ``kernels``
  package's download entry points and its layer mapping before anything imports it. Code
  shipped with a model runs only under ``model.trust_remote_code`` (engine.models.consent).
- Telemetry: huggingface_hub's usage pings (TRL sends one per trainer) are off.
- Hub ids: a model named by hub id is read from the local cache when it is there (and the
  process then stays offline: no retry loops against an unreachable hub); otherwise one quick
  connect decides, and with no route the caller gets one line naming the local-directory way,
  in well under 2 s, instead of the client's minute of ``Retrying in Ns`` lines.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

# the kernels package's entry points that fetch from the Hub (its local-path loaders stay)
_FETCHERS = ("get_kernel", "get_locked_kernel", "has_kernel", "install_kernel")
REFUSAL = ("qlora-tui does not download or run kernels from the Hub (code from the network runs "
           "only when you ask for it)")


class HubKernelRefused(RuntimeError):
    pass


def _refuse(*_a, **_kw):
    raise HubKernelRefused(REFUSAL)


def _disarm(module) -> None:
    for name in _FETCHERS:
        if hasattr(module, name):
            setattr(module, name, _refuse)
    module.__qlora_tui_disarmed__ = True


class _KernelsGuard(importlib.abc.MetaPathFinder):
    """Disarms the ``kernels`` package as it is imported (whoever imports it first)."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, run = spec.loader, spec.loader.exec_module

        def exec_module(module):
            run(module)
            _disarm(module)
        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Idempotent; cheap (no import of the libraries)."""
    os.environ.setdefault("DISABLE_KERNEL_MAPPING", "1")     # kernels' layer mapping: original forwards
    # huggingface_hub's usage telemetry (TRL sends it when a trainer is built) and the agent
    # registry its request headers fetch: requests nobody asked for (read at its import)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    mod = sys.modules.get("kernels")
    if mod is not None:
        if not getattr(mod, "__qlora_tui_disarmed__", False):
            _disarm(mod)
        return
    if not any(isinstance(f, _KernelsGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsGuard())


# ---------------------------------------------------------------------------------------------
# hub ids

_reach: dict[str, str | None] = {}


def unreachable(timeout: float = 1.5) -> str | None:
    """Why the hub cannot be reached from here (offline mode, no route), or None. One quick
    connect instead of the client's retries; asked once a process."""
    from urllib.parse import urlparse
    if offline():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    key = f"{host}:{port}"
    if key not in _reach:
        import socket
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _reach[key] = None
        except OSError as e:
            _reach[key] = f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return _reach[key]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")


def go_offline() -> None:
    """From here on this process reads the hub's local cache only (no request, no retry)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = sys.modules.get("huggingface_hub.constants")
    if hf is not None:
        hf.HF_HUB_OFFLINE = True


def cached_file(repo: str, filename: str, revision: str | None = None, repo_type: str = "model") -> str | None:
    """The local cache's copy of ``filename`` of ``repo`` (no request), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        p = try_to_load_from_cache(repo, filename, revision=revision, repo_type=repo_type)
    except Exception:       # a malformed id or cache: not cached
        return None
    return p if isinstance(p, str) else None


def check_model_id(repo: str, revision: str | None = None, *, what: str = "model.name =",
                   fix: str = "point model.name at a local model directory") -> None:
    """A model named by hub id must be cached here or the hub reachable; raises ValueError with
    one line otherwise (``what`` names where the id came from, ``fix`` what to do). Cached and
    unreachable: the process goes offline (reads the cache, never retries)."""
    cached = cached_file(repo, "config.json", revision)
    if cached is not None and (offline() or unreachable() is not None):
        go_offline()
        return
    if cached is not None:
        return
    why = unreachable()
    if why:
        raise ValueError(f"{what} {repo!r} is a hub id and the hub is unreachable: {why}. {fix[:1].upper()}{fix[1:]} "
                         f"(download it where the hub answers: huggingface-cli download {repo} --local-dir DIR)")
