"""Writes that must never leave a half-written file behind: a temporary name, fsync, rename, fsync the folder.
And what to tell the user when the filesystem refuses (``explain``).

Readers then see the old file or the new one, whole, even after a crash or a kill -9 mid-write.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

# errno → what the user can do about it (the reason itself is the error's own text)
ADVICE = {
    errno.ENOSPC: "free space there (or point the output elsewhere), then run the command again",
    errno.EDQUOT: "free space within your quota (or point the output elsewhere), then run the command again",
    errno.EFBIG: "the file outgrew the size allowed to this process or filesystem (ulimit -f?): raise the limit or "
                 "write elsewhere",
    errno.EACCES: "make it writable (or readable) for this user, or choose another location",
    errno.EPERM: "make it writable (or readable) for this user, or choose another location",
    errno.EROFS: "choose a location on a writable filesystem",
    errno.ENOTDIR: "a part of that path is a file, not a directory: move the file or choose another location",
    errno.EEXIST: "move what is there away, or choose another location",
    errno.EISDIR: "a directory is in the way: move it away, or choose another location",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the disk or network filesystem failed: check it, then run the command again",
    errno.EMFILE: "raise the limit of open files (ulimit -n), then run the command again",
}


def is_filesystem_error(error: BaseException) -> bool:
    """An ``OSError`` about a file or folder (as opposed to, say, a network connection)."""
    return isinstance(error, OSError) and error.errno in ADVICE


def explain(error: OSError, path: str | os.PathLike | None = None) -> str:
    """``<path>: <reason>; <what to do>`` for a filesystem error (the path from the error unless given)."""
    where = path if path is not None else error.filename
    reason = error.strerror or str(error)
    advice = ADVICE.get(error.errno)
    text = f"{reason}; {advice}" if advice else reason
    return f"{where}: {text}" if where is not None else text


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free on the filesystem holding ``path`` (or its nearest existing parent); None when unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_opened(path: str | os.PathLike) -> None:
    """Give a file the permissions a plain ``open`` would (0666 & ~umask): writers that make files 0600
    (safetensors, mkstemp) would leave them unreadable to colleagues on a shared filesystem."""
    os.chmod(path, 0o666 & ~umask())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")
