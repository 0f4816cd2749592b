"""One writing command per workdir at a time.

Two commands writing into one workdir race inside the stages' atomic writes (each cleans the
other's temporary folders, ``io.atomic_dir``) and one dies with a raw traceback. Each writing
command therefore takes ``<workdir>/.lock`` first and a second one stops at once, naming the
first. The lock is an ``fcntl.flock`` on an open descriptor, so the kernel drops it when the
holder dies however it dies (SIGKILL included): a lock of a killed command never blocks the
next. The file's JSON (pid, host, command line, start time) only words the message.

The lock is per command (the driver process). The Ray workers a command starts write into the
workdir on its behalf and take no lock; they are not forked from the driver, so they do not hold
its descriptor either.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmser_ray.errors import WorkdirInUse

LOCK_NAME = ".lock"
# Locks this process holds, by resolved path, with a nesting count: a command that calls another
# locked entry point (``run`` -> stages) must not block on itself (flock excludes a second
# descriptor of the same process too).
_held: dict[Path, list[Any]] = {}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive ``flock`` on ``path`` (created with its folder): for short
    machine-wide critical sections (unpacking the bundled LLM, starting a local Ray). The kernel
    drops it when the holder dies, so a killed holder never blocks the next."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(workdir: str | Path) -> Path:
    return Path(workdir).expanduser().resolve() / LOCK_NAME


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The JSON a holder wrote into the lock file, or None (no file, empty, or not ours)."""
    try:
        data = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = "llmser-ray"  # `python -m llmser_ray ...`
    else:
        argv[:1] = [Path(argv[0]).name] if argv else ["python"]
    return " ".join(argv)


def busy_message(workdir: Path, holder: dict[str, Any] | None) -> WorkdirInUse:
    """The one-line error for a workdir that another command holds."""
    if not holder:
        who = "another llmser-ray command (it has not written its details yet)"
    else:
        cmd = str(holder.get("command", "?"))
        cmd = cmd if len(cmd) <= 160 else cmd[:157] + "..."
        since = holder.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
            since, (int, float)) else "?"
        host = holder.get("hostname")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        pid = holder.get("pid")
        gone = (not where and isinstance(pid, int) and not _pid_alive(pid))
        left = "; it has exited, a process it started still holds the lock" if gone else ""
        who = f"pid {pid if pid is not None else '?'}{where} (`{cmd}`, since {when}{left})"
    return WorkdirInUse(
        f"workdir {workdir} is in use by {who}",
        "wait for that command to finish, or give this one another --workdir",
    )


def _try_flock(fd: int, path: Path) -> bool:
    """Take the exclusive flock without waiting; False if another descriptor holds it.

    Where the file system has no locks (ENOLCK, EOPNOTSUPP: some network mounts) the recorded
    holder decides: held while that pid lives on this host, free once it is gone.
    """
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        holder = read_holder(path)
        pid = holder.get("pid") if holder else None
        if not isinstance(pid, int) or pid == os.getpid():
            return True
        if holder.get("hostname") != socket.gethostname():  # type: ignore[union-attr]
            return False  # cannot see another host's processes: assume it still runs
        return not _pid_alive(pid)
    return True


def acquire(workdir: str | Path) -> int:
    """Take the workdir's lock and return its descriptor; raise ``WorkdirInUse`` if held.

    A lock file left behind by a dead holder carries no flock any more and is simply taken
    over. A holder that releases unlinks the file; an opener that raced that unlink could lock
    the orphaned inode, so the lock counts only if the path still names the locked inode.
    """
    path = lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_flock(fd, path):
                raise busy_message(path.parent, read_holder(path))
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and unlinked between our open and our flock: retry
                os.close(fd)
                continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        info = {"pid": os.getpid(), "hostname": socket.gethostname(), "command": _command_line(),
                "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return fd
    raise busy_message(path.parent, read_holder(path))  # pragma: no cover - 20 lost races


def release(workdir: str | Path, fd: int) -> None:
    """Unlink the lock file while still holding it, then drop the lock."""
    path = lock_path(workdir)
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            path.unlink()
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[Path]:
    """Hold ``<workdir>/.lock`` for the block (re-entrant within this process)."""
    path = lock_path(workdir)
    entry = _held.get(path)
    if entry is not None:
        entry[1] += 1
    else:
        created = not path.parent.exists()
        _held[path] = entry = [acquire(workdir), 1, created]
    try:
        yield path
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del _held[path]
            release(workdir, entry[0])
            if entry[2]:  # a command that failed before writing anything leaves no empty workdir
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
