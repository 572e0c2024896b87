"""One run per output folder at a time: two runs into the same OUTPUT_DIR would each do every case
and overwrite each other's summary. The lock file holds the owner's host and pid; a lock whose
process is gone (a killed run) is taken over, so ``--resume`` after a crash just works."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

LOCK_NAME = ".segreport.lock"


class RunLockedError(RuntimeError):
    """Another live segreport run is writing to this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``with RunLock(output_dir): ...``; raises :class:`RunLockedError` when a live run holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                same_host = holder.get("host") == self.owner["host"]
                if same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # stale: that run was killed
                    continue
                raise RunLockedError(
                    f"{self.path.parent}: another segreport run is writing here "
                    f"(pid {holder.get('pid')} on {holder.get('host')}; lock file {self.path}). Wait for it, or "
                    "remove the lock file if that run is gone.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return self
        raise RunLockedError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
