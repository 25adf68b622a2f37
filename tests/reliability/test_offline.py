"""Nothing reaches the network unless the user asked: a process whose every socket connection is
refused (and recorded) trains, inspects and exports; a hub id with no route fails in one line
after one quick connect, never the client's retry loop; a cached hub model trains offline; and
no kernel is downloaded from the Hub, whoever asks for one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliability_helpers import REPO

SITE = '''
import os, socket
_LOG = os.environ["QLORA_TEST_NET_LOG"]
_LOCAL = ("localhost", "127.0.0.1", "::1", None, "")

def _record(what):
    with open(_LOG, "a") as f:
        f.write(what[:200] + "\\n")
    raise OSError(101, "Network is unreachable (no network in this test)")

_real_connect, _real_connect_ex, _real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _record(f"connect {address!r}")
    return _real_connect(self, address)

def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL:
        _record(f"connect_ex {address!r}")
    return _real_connect_ex(self, address)

def getaddrinfo(host, *a, **kw):
    if host not in _LOCAL:
        _record(f"getaddrinfo {host!r}")
    return _real_gai(host, *a, **kw)

socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.fixture
def no_network(tmp_path):
    """(env, attempts): an environment whose processes can open no connection off this machine;
    every attempt is recorded. HF_HUB_OFFLINE is unset, as for a user."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    log = tmp_path / "net-attempts.log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                            "QLORA_TUI_FAULTS")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), QLORA_TEST_NET_LOG=str(log),
               HF_HOME=str(tmp_path / "hf-home"))
    return env, log


def _engine(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def _no_retries(*procs):
    for p in procs:
        assert "Retrying" not in p.stdout + p.stderr and "Traceback" not in p.stdout + p.stderr, \
            p.stdout[-2000:] + p.stderr[-2000:]


def test_train_inspect_export_open_no_connection(no_network, tmp_path):
    """The three commands in one process (one Python start-up), as `python -m engine` runs each."""
    env, log = no_network
    runs = tmp_path / "runs"
    train = ["train", str(REPO / "examples" / "demo.toml"), "--headless", "--set", "train.max_steps=3",
             "--set", "train.eval_steps=2", "--set", "train.save_steps=0",
             "--set", f"output.dir={json.dumps(str(runs))}"]
    inspect = ["inspect", "builtin:sample", "--model", "builtin:tiny"]
    export = ["export", "RUN", "--gguf", "f16", "--out", str(tmp_path / "out")]
    code = ("import sys, json, pathlib\n"
            "from engine.cli import main\n"
            "cmds = json.loads(sys.argv[1])\n"
            "for cmd in cmds:\n"
            "    if 'RUN' in cmd:\n"
            "        cmd[cmd.index('RUN')] = str(next(pathlib.Path(sys.argv[2]).iterdir()))\n"
            "    rc = main(cmd)\n"
            "    print('RC', cmd[0], rc, flush=True)\n"
            "    if rc:\n"
            "        sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps([train, inspect, export]), str(runs)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert [ln for ln in p.stdout.splitlines() if ln.startswith("RC ")] == ["RC train 0", "RC inspect 0",
                                                                           "RC export 0"]
    _no_retries(p)
    assert log.read_text() == "", log.read_text()


def test_no_kernel_is_downloaded_from_the_hub(no_network):
    """The ``kernels`` package's fetchers refuse (bitsandbytes asks for one on some CPUs as it is
    imported); its layer mapping is off; nothing is attempted."""
    env, log = no_network
    code = ("import engine, kernels, os\n"
            "from engine.core.hub import HubKernelRefused\n"
            "for f in (kernels.get_kernel, kernels.get_locked_kernel, kernels.has_kernel):\n"
            "    try:\n"
            "        f('kernels-community/quantization-bitsandbytes')\n"
            "    except HubKernelRefused as e:\n"
            "        print('refused', f.__name__ if hasattr(f, '__name__') else '')\n"
            "import bitsandbytes\n"
            "print('mapping off', os.environ.get('DISABLE_KERNEL_MAPPING'))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("refused") == 3 and "mapping off 1" in p.stdout, p.stdout
    assert log.read_text() == ""


@pytest.mark.parametrize("args", [
    ("train", "{cfg}", "--headless"),
    ("inspect", "builtin:sample", "--model", "some-org/some-model"),
    ("estimate", "{cfg}"),
    ("merge", "{adapter}", "--out", "{out}"),
])
def test_a_hub_id_with_no_route_fails_in_one_line_after_one_connect(no_network, tmp_path, args):
    env, log = no_network
    cfg = tmp_path / "hub.toml"
    cfg.write_text('[model]\nname = "some-org/some-model"\n[data]\ntrain = "builtin:sample"\n'
                   f'[output]\ndir = {json.dumps(str(tmp_path / "runs"))}\n')
    adapter = tmp_path / "adapter"          # an adapter trained on a hub model: its base is that id
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "some-org/some-model", "peft_type": "LORA", "r": 4, "lora_alpha": 8,
         "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    p = _engine(env, *[a.format(cfg=cfg, adapter=adapter, out=tmp_path / "merged") for a in args], timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    _no_retries(p)
    line = next(ln for ln in out.splitlines() if "hub is unreachable" in ln)
    assert "some-org/some-model" in line and "local model directory" in line, out
    assert len(log.read_text().splitlines()) == 1, log.read_text()    # the one quick check


def _cache_as_hub_model(src: Path, hub_cache: Path, repo: str) -> None:
    """``src`` laid out as huggingface_hub's cache holds a downloaded ``repo`` (refs/main -> a
    snapshot), the way `huggingface-cli download` leaves it."""
    import shutil
    d = hub_cache / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    shutil.copytree(src, d / "snapshots" / commit)


def test_a_cached_hub_model_trains_with_no_network(no_network, tmp_path):
    env, log = no_network
    from engine.core import config
    from engine.models.source import model_path
    tiny = Path(model_path(config.load(REPO / "examples" / "demo.toml")))
    _cache_as_hub_model(tiny, Path(env["HF_HOME"]) / "hub", "some-org/tiny-llama")
    p = _engine(env, "train", REPO / "examples" / "demo.toml", "--headless",
                "--set", 'model.name="some-org/tiny-llama"', "--set", "train.max_steps=2",
                "--set", "train.save_steps=0", "--set", f"output.dir={json.dumps(str(tmp_path / 'runs'))}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    _no_retries(p)
    assert len(log.read_text().splitlines()) <= 1, log.read_text()
