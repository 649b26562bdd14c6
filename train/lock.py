"""One training run per workdir: a lock file naming the holder's host and pid.

A second run on the same workdir refuses with the holder's name; a lock left by a run that was
killed (its pid no longer alive on this host) is taken over. A lock held from another host cannot
be checked from here: the message says which host and how to remove it if that run is gone.
Local workdirs get an atomic O_EXCL create; remote (fsspec) ones a check-then-write, which is as
good as those stores allow.
"""

import contextlib
import errno
import json
import os
import socket
import time

from etils import epath

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _holder_text(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if started else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{when}"


def _alive_here(holder: dict) -> bool | None:
    """True/False for a holder on this host; None when it runs elsewhere (cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (OSError, ValueError):
        return False
    return True


def _read(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, ValueError):
        return {}


def _create_exclusive(path: epath.Path, text: str) -> bool:
    if "://" not in str(path):
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as error:
            if error.errno == errno.EEXIST:
                return False
            raise
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if path.exists():
        return False
    path.write_text(text)
    return True


def acquire(workdir) -> epath.Path:
    """Take the workdir's lock for this process; returns the lock path.

    Raises WorkdirLockedError naming the holder when a live run holds it."""
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    text = json.dumps(me)
    for _ in range(3):
        if _create_exclusive(path, text):
            return path
        holder = _read(path)
        alive = _alive_here(holder)
        if alive is False or not holder:
            # A killed run (or a half-written lock): take it over. Removing and re-creating
            # keeps the O_EXCL race between two new runs.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        extra = "" if alive else (
            f"; if that run is gone, delete {path} and start again")
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by another training run ({_holder_text(holder)}); "
            f"lock file {path}{extra}"
        )
    raise WorkdirLockedError(f"could not take the lock {path}: other runs keep replacing it")


def release(path: epath.Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _read(path)
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def workdir_lock(workdir, *, enabled: bool = True):
    """Hold the workdir's lock for the body (a no-op when not `enabled`: processes other than 0)."""
    if not enabled:
        yield None
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
