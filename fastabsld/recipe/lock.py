"""The run folder's lock: while a run writes a folder, a second run in it stops with an error naming the holder.

The lock is ``fcntl.flock`` on ``<run_dir>/run.lock``, a file that records the holder's pid, host and
start time. The kernel releases a flock when its process ends in any way (an exception, Ctrl-C,
SIGKILL), so a lock file left by a dead process does not block anything; the file itself stays.
Within one process the lock is re-entrant (the command line takes it before it reads the folder,
the epoch loop again around the run). On a platform without ``fcntl`` nothing is locked.
"""

import contextlib
import datetime
import json
import os
import socket

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from fastabsld.recipe.errors import DISK_FULL, RunLockedError, WriteError

LOCK_FILE = "run.lock"

# realpath of a folder this process holds the lock of -> the lock file's descriptor
_held = {}


def _read_holder(fd):
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def holder(run_dir):
    """The record of the process that holds ``run_dir``'s lock, or None when nobody holds it.

    Args:
        run_dir: the run folder.

    Returns:
        dict or None: ``{"pid", "host", "since"}`` of a live holder (``{}`` when it has not written its
        record yet), None when the folder is free.
    """
    path = os.path.join(run_dir, LOCK_FILE)
    if fcntl is None or not os.path.exists(path):
        return None
    if os.path.realpath(run_dir) in _held:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        return None
    finally:
        os.close(fd)  # also releases the probe's shared lock


@contextlib.contextmanager
def hold(run_dir, *, wait=False, log=None):
    """Holds ``run_dir``'s lock for the duration of the ``with`` block (creating the folder if needed).

    Args:
        run_dir: the run folder.
        wait: wait for the holder to finish instead of raising (the teacher cache: the other process
            trains the same teacher, and its result is what this one needs).
        log: function printing one-line messages (the wait), or None.

    Yields:
        None.

    Raises:
        RunLockedError: another live process holds the lock (and ``wait`` is False).
        WriteError: the disk is too full to create the lock file or write its record.
    """
    key = os.path.realpath(run_dir)
    if fcntl is None or key in _held:  # no locking here, or an outer block of this process holds it
        yield
        return
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        raise WriteError(path, error) from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_holder(fd)
            if not wait:
                raise RunLockedError(run_dir, record) from None
            if log:
                who = f"process {record.get('pid')} on {record.get('host')}" if record else "another process"
                log(f"waiting for {who}, which holds {run_dir}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as error:  # a full disk: say so before the run computes anything
            raise WriteError(path, error) from error
        _held[key] = fd
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)  # a reader between this and the close sees "starting", not a stale pid
    finally:
        os.close(fd)  # releases the flock
