"""An exclusive lock on one shard of an evaluation run folder, so that two processes never write it at once.

``RUNDIR/.lock-<rank>`` is locked with ``flock`` while a process writes that shard: the kernel drops the lock when
the process ends, however it ends (a SIGKILL included), so a lock file left by a dead process is stale by
construction and is simply taken over. The file records the owner (pid, host, start time) for the error message and
is removed on release; a process that locked a file which was removed or replaced meanwhile tries again, so two
processes never hold two different files. Where ``fcntl`` is missing, the lock falls back to creating the file
exclusively and treats it as stale when its process (by pid and start time) no longer exists.

Example:
    >>> with RunLock("runs/a", rank=0):  # doctest: +SKIP
    ...     pass  # append to runs/a/results-0.jsonl
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from attnseg.errors import RunLockedError

__all__ = ["RunLock", "lock_path", "process_alive"]

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_path(rundir: str | Path, rank: int) -> Path:
    """``RUNDIR/.lock-<rank>``."""
    return Path(rundir) / f".lock-{int(rank)}"


def _start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process ``pid`` (on this machine) still runs; with ``start_ticks``, the same process, not a reuse."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    if start_ticks is not None:
        now = _start_ticks(pid)
        if now is not None and now != start_ticks:
            return False
    return True


class RunLock:
    """Hold ``RUNDIR/.lock-<rank>`` while writing one shard of a run folder.

    Args:
        rundir: the run folder (must exist).
        rank: the shard.

    Raises:
        RunLockedError: on :meth:`acquire`, when a live process holds the lock.
    """

    def __init__(self, rundir: str | Path, rank: int = 0) -> None:
        self.rundir = Path(rundir)
        self.rank = int(rank)
        self.path = lock_path(rundir, rank)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict[str, Any]:
        """What the lock file says about its owner (``{}`` when unreadable)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({
            "pid": pid, "host": socket.gethostname(), "start_ticks": _start_ticks(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rank": self.rank,
        }).encode()

    def _refuse(self) -> RunLockedError:
        owner = self.owner()
        who = f"process {owner.get('pid', '?')}"
        if owner.get("host") and owner.get("host") != socket.gethostname():
            who += f" on {owner['host']}"
        since = f" since {owner['since']}" if owner.get("since") else ""
        shard = f" (shard {self.rank})" if self.rank else ""
        return RunLockedError(
            f"{self.rundir}{shard} is being written by {who}{since}; wait for it to finish or stop it, or use another "
            f"--out folder (if that process is gone, delete {self.path})"
        )

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        if fcntl is not None:
            for _ in range(20):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise self._refuse() from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # released and removed by its owner between our open and our lock: try again
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, self._record())
                self._fd = fd
                return self
            raise self._refuse()
        for _ in range(3):  # pragma: no cover - platforms without fcntl
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self.owner()
                local = owner.get("host") in (None, socket.gethostname())
                if owner and local and not process_alive(int(owner.get("pid", 0)), owner.get("start_ticks")):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()  # stale: its process is gone
                    continue
                raise self._refuse() from None
            os.write(fd, self._record())
            self._fd = fd
            return self
        raise self._refuse()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: a waiting process notices the removal and tries again
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()
