"""Files ktgen reads and writes: every file it reads may come from someone else (a checkpoint
from the Hub, a pack directory copied between machines), every file it writes may be read
while it is being written.

Reading: `open_regular` opens regular files only (never blocking on a FIFO or a device: the
path is checked with os.stat first, opened non-blocking, and checked again on the descriptor),
and `file_in` resolves a name a file gives (a shard of a checkpoint index, a layer of a pack
index) to a regular file inside the directory it belongs to: no absolute path, no `..`, no
symlink that leads out. Writing: `atomic_path` and `write_atomic` write a temporary file in the
same directory and rename it over the target, so that a reader sees the old file or the new
one, never a part.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator


def open_regular(path, error: type[Exception], what: str = "file"):
    """`path` opened for binary reading, unbuffered, when it is a regular file; else `error`
    naming it (a missing file, a directory, a FIFO, a device)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise error(f"{path}: cannot read this {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: this {what} is not a regular file ({_kind(st.st_mode)})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise error(f"{path}: cannot read this {what} ({err.strerror or err})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):   # replaced between the two checks
        os.close(fd)
        raise error(f"{path}: this {what} is not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def read_bytes(path, error: type[Exception], what: str = "file", limit: int = 256 << 20) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: this {what} has {size} bytes, more than the {limit} ktgen reads")
        return f.readall()


def read_json(path, error: type[Exception], what: str = "file"):
    """A regular file's JSON value; unreadable or invalid JSON is `error` naming the file."""
    data = read_bytes(path, error, what)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise error(f"{path}: this {what} is not valid JSON ({err})") from None


def file_in(directory, name, error: type[Exception], what: str, symlinks_out: bool = False) -> Path:
    """The regular file that `name` (as an index states it) names inside `directory`: a
    relative path without '..', whose target (symlinks followed) is inside the directory unless
    `symlinks_out`."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{what}: expected a file name inside {directory}, got {name!r}")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise error(f"{what}: {name!r} is not a file name inside {directory} (absolute paths and '..' "
                    f"are refused)")
    path = directory / name
    root = os.path.realpath(directory)
    if not symlinks_out and os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise error(f"{what}: {name!r} leads out of {directory} (a symlink to "
                    f"{os.path.realpath(path)})")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what}: {path} is missing") from None
    except OSError as err:
        raise error(f"{what}: cannot read {path} ({err.strerror or err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: {path} is not a regular file ({_kind(st.st_mode)})")
    return path


@contextlib.contextmanager
def atomic_path(path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed over `path` when the block succeeds,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # created as open() would create the file (mode 0666 less the umask), not 0600 as mkstemp
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path, data: bytes | str, fsync: bool = False) -> None:
    """Write `data` (str: UTF-8) to `path` atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
