"""One `kedro run` at a time per project: an exclusive lock on `data/.medseg.lock`.

Two runs in the same project write the same catalog entries (phantoms, models, predictions,
reports) and would corrupt each other's outputs. The second run is refused with a message
that names the first (its pid, pipeline and start time). The lock is an `fcntl.flock` on an
open file: the operating system releases it when the process ends, even after SIGKILL, so a
stale lock file never blocks a later run.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import stat
from pathlib import Path

from medseg.errors import MedsegError

LOCK_NAME = ".medseg.lock"


class ProjectBusyError(MedsegError):
    """Another `kedro run` holds this project's lock."""


class ProjectLock:
    """An exclusive, non-blocking lock on `<project>/data/.medseg.lock`.

    Args:
        project_path: the Kedro project root.
    """

    def __init__(self, project_path: str | os.PathLike):
        self.path = Path(project_path) / "data" / LOCK_NAME
        self._file = None

    def acquire(self, pipeline: str) -> None:
        """Take the lock, or raise ProjectBusyError naming the run that holds it."""
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a symlink: taking the lock truncates the file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ProjectBusyError(
                f"{self.path}: the lock file is a symlink or cannot be opened ({exc.strerror}); medseg takes its lock "
                "only on a regular file of its own. Remove it (rm) and run again."
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ProjectBusyError(f"{self.path} is not a regular file. Remove it and run again.")
        handle = os.fdopen(fd, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ProjectBusyError(
                f"{self.path}: another kedro run is running in this project ({holder}). Two runs in one "
                "project would overwrite each other's data, models and reports. Wait for it to finish, "
                "or run the second one from a copy of the project."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "pipeline": pipeline, "started": dt.datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self._file.truncate(0)
            fcntl.flock(self._file, fcntl.LOCK_UN)
        finally:
            self._file.close()
            self._file = None
