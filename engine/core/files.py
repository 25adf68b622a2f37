"""Every file the program reads itself, and every output it writes, goes through here.

Reading: ``open_regular`` / ``read_bytes`` / ``read_text`` / ``read_json`` open a path without
blocking (a FIFO never hangs the reader), check that it is a regular file (never a device such
as ``/dev/zero``, a FIFO or a socket) and, for whole-file reads, that it is of sane size before
a byte is read. A refusal is ``NotRegular`` or ``TooLarge``: ``OSError`` subclasses whose
``str`` is one line naming the path, so every existing ``except OSError`` says it as it is.

Writing: ``check_output`` refuses an output that is a symlink or already holds something before
any work is done; ``staged_dir`` writes a directory output into a temporary folder that only we
created (``mkdtemp`` beside it) and renames it in at the end; ``write_atomic`` does the same for
one file. Nothing here ever removes a file or folder it did not create.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

KiB, MiB = 1024, 1024 * 1024
# what each kind of file may hold at most (a config is a few KiB; tokenizer files can be tens of MiB)
CONFIG_LIMIT = 4 * MiB         # TOML configs, Axolotl YAML, run.json, settings, chat templates
JSON_LIMIT = 64 * MiB          # a model's config.json / tokenizer_config.json / adapter_config.json


class NotRegular(OSError):
    """The path is not a regular file (a FIFO, a device, a socket, a directory)."""

    def __init__(self, path, what: str):
        super().__init__(errno.EINVAL, f"not a regular file ({what}); give a regular file", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class TooLarge(OSError):
    """A whole-file read of more bytes than the kind of file may hold."""

    def __init__(self, path, size: int, limit: int):
        super().__init__(errno.EFBIG, f"too large to be this kind of file ({_size(size)}; the limit is "
                                      f"{_size(limit)})", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _size(n: int) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB" if n >= KiB else f"{n} bytes"


def kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a plain file"


def open_regular(path: str | Path) -> IO[bytes]:
    """``path`` opened for binary reading, checked to be a regular file first. The open itself
    never blocks (``O_NONBLOCK``: a FIFO with no writer does not hang it); the file is then read
    as usual. Raises ``NotRegular``, or the OSError of the open (FileNotFoundError, ...)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:                    # a socket (or a FIFO opened by nobody)
            raise NotRegular(path, "a socket") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path, kind_of(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: str | Path) -> None:
    """Raise ``NotRegular`` (or the open's OSError) unless ``path`` can be read as a regular file."""
    open_regular(path).close()


def read_bytes(path: str | Path, limit: int = CONFIG_LIMIT) -> bytes:
    """The whole file, refused (``TooLarge``) beyond ``limit`` bytes, never more read."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise TooLarge(path, size, limit)
        data = fh.read(limit + 1)                     # a file that grew since the fstat
    if len(data) > limit:
        raise TooLarge(path, len(data), limit)
    return data


def read_text(path: str | Path, limit: int = CONFIG_LIMIT, encoding: str = "utf-8-sig") -> str:
    """``read_bytes`` decoded (a BOM is accepted); UnicodeDecodeError says where."""
    return read_bytes(path, limit).decode(encoding)


def read_json(path: str | Path, limit: int = JSON_LIMIT):
    """A JSON file (ValueError when it is not JSON, nested too deeply included)."""
    return loads_json(read_bytes(path, limit))


def loads_json(raw: bytes | str):
    """``json.loads``, with nesting too deep for the parser a ValueError like any other bad JSON."""
    import json
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply (the JSON parser's recursion limit); flatten it") from None


# --------------------------------------------------------------------------- outputs

class OutputError(OSError):
    """An output that cannot be written where asked; ``str`` is one line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cannot write the output"


def check_output(out: str | Path, *, what: str = "--out", allow_empty_dir: bool = True,
                 overwrite_file: bool = False) -> Path:
    """Refuse, before any work: an output that is a symlink, a non-empty directory, an existing
    file (unless ``overwrite_file``), or one whose folder cannot be written. Returns the path."""
    out = Path(out).expanduser()
    if out.is_symlink():
        raise OutputError(f"{what} {out} is a symlink; give a new path (nothing is written through a link)")
    if out.exists():
        if out.is_dir():
            if not allow_empty_dir or any(out.iterdir()):
                raise OutputError(f"{what} {out} already exists and is not empty; choose a new path or remove it")
        elif not overwrite_file:
            raise OutputError(f"{what} {out} already exists; choose a new path (or --force where offered)")
        elif not out.is_file():
            raise OutputError(f"{what} {out} is not a regular file; choose a new path")
    parent = next((p for p in (out.parent, *out.parent.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OutputError(f"{what} {out}: cannot write there ({parent} is not a directory); choose a writable directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {out}: cannot write there ({parent} is not writable); choose a writable directory")
    return out


def current_umask() -> int:
    """This process's umask, read without changing it (thread-safe: /proc), else 022."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def normalise_modes(root: Path) -> None:
    """Files 0666 and folders 0777 less the umask, through a whole tree we wrote (libraries
    write some files 0600 and others 0644; one output has one mode)."""
    mask = current_umask()
    for dirpath, dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """``with staged_dir(out) as tmp:`` write the output into ``tmp`` (a new folder beside
    ``out`` that only we created); on success it becomes ``out`` (which must not exist, or be
    an empty directory: ``check_output``), with one set of file modes; on any failure ``tmp``
    is removed and ``out`` is untouched."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        normalise_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, out)       # refused (``out`` changed meanwhile): the finished output stays in tmp


def commit_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; ``out`` may be an empty directory (then its entries move into it:
    a folder the user made is never removed), nothing else."""
    if out.is_symlink():
        raise OutputError(f"{out} is a symlink; nothing was written through it")
    if out.is_dir():                      # the user's empty folder: kept, filled (never removed)
        if any(out.iterdir()):
            raise OutputError(f"{out} is no longer empty; the output stays in {tmp}")
        for entry in sorted(os.listdir(tmp)):
            os.rename(tmp / entry, out / entry)
        tmp.rmdir()
        return
    if out.exists():
        raise OutputError(f"{out} appeared while writing; the output stays in {tmp}")
    os.rename(tmp, out)


def write_atomic(path: str | Path, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write one file whole or not at all: a temporary file that only we created beside it,
    renamed over it. Its mode is 0666 less the umask (or ``mode``). Never follows or replaces
    a symlink's target."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def tail_lines(path: str | Path, limit: int = 65536, complete: bool = False) -> list[str]:
    """The non-blank lines in the last ``limit`` bytes of a regular file (a log's tail: never the
    whole file); [] when it cannot be read. ``complete``: drop a last line without its newline
    (one still being written)."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - limit))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = text.split("\n")[:-1] if complete else text.splitlines()
    return [ln for ln in lines if ln.strip()]
