"""Checkpoint files: checksummed, atomic, readable by the group, with the previous one kept as a fallback.

A checkpoint is a ``torch.save`` file followed by a fixed-size trailer: a magic string, the payload's
length and its SHA-256. ``torch.load`` reads such a file as it is (it ignores bytes after the zip
archive), and :func:`load` verifies the trailer first, so a flipped byte, a truncated write or a
foreign file is a :class:`CheckpointError` naming the file and the problem instead of silently
different weights or a traceback. Files without a trailer (written elsewhere, or by an older
version) still load, unverified.

Every file is written to a temporary name in the same folder, flushed to disk, verified, then
renamed over the destination; temporary files are created with mode 0666 less the umask, like any
other file, so colleagues who may read the folder may read the run. With ``keep_previous`` the
destination's current version is first kept as ``<name>.prev.pt`` (``last.prev.pt``), so a file
damaged on disk costs one checkpoint interval, not the run.
"""

import contextlib
import hashlib
import os
import random
import re
import secrets
import struct

import numpy as np
import torch

from fastabsld.recipe.errors import CheckpointError, WriteError

__all__ = ["FORMAT", "CheckpointError", "WriteError", "atomic_save", "atomic_write_text", "previous_path", "read",
           "load", "load_latest", "remove_stale_temporaries", "rng_state", "set_rng_state", "verify"]

# Version of the checkpoint layout (written into every checkpoint and into the teacher cache's hash).
FORMAT = 1

_MAGIC = b"fastabsld-sha256"
# magic (16 bytes), payload length (uint64, little-endian), SHA-256 of the payload (32 bytes)
_TRAILER = struct.Struct("<16sQ32s")
_CHUNK = 1 << 20
# The zip archive's end-of-central-directory signature, and how far from the end it may lie (its comment).
_EOCD = b"PK\x05\x06"
_EOCD_SEARCH = 22 + 65535
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def previous_path(path):
    """Where :func:`atomic_save` keeps the previous version of ``path`` (``last.pt`` -> ``last.prev.pt``).

    Args:
        path: a checkpoint path.

    Returns:
        str: the path of its previous version.
    """
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext or '.pt'}"


def _temporary(path):
    """Creates an empty temporary file beside ``path`` (mode 0666 less the umask) and returns (fd, name)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _sync_folder(path):
    """Flushes the folder entry of a rename to disk where the platform allows it."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp, path):
    os.replace(tmp, path)
    _sync_folder(path)


def _keep_as_previous(path):
    """Makes the current ``path`` also ``previous_path(path)`` (a hard link, else a copy), atomically."""
    prev = previous_path(path)
    fd, tmp = _temporary(prev)
    os.close(fd)
    try:
        os.remove(tmp)
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        _replace(tmp, prev)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _HashingWriter:
    """A binary file wrapper that hashes and counts what ``torch.save`` writes through it.

    ``torch.save`` turns a failed write into a RuntimeError of its zip writer ("unexpected pos");
    the OSError behind it (a full disk, a quota) is kept in ``error`` so that the caller can report it.
    """

    def __init__(self, f):
        self.file, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def _write_payload(obj, f):
    """Serialises ``obj`` into the open file ``f`` and appends its checksum trailer."""
    writer = _HashingWriter(f)
    try:
        torch.save(obj, writer)
    except RuntimeError as error:
        if writer.error is not None:  # the file system refused the data: report that, not the zip writer's symptom
            raise writer.error from error
        raise
    f.write(_TRAILER.pack(_MAGIC, writer.size, writer.sha.digest()))


@contextlib.contextmanager
def _writing(path):
    """Turns an OSError of writing ``path`` (a full disk, a quota, a read-only folder) into a :class:`WriteError`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(path, error) from error


def atomic_save(obj, path, *, keep_previous=False):
    """Writes ``obj`` as a checksummed checkpoint so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same folder, is flushed to disk and verified (read back
    against its checksum), then renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows).
    If anything fails, the temporary file is removed and ``path`` is untouched.

    Args:
        obj: anything ``torch.save`` accepts.
        path: destination file; its folder is created if needed.
        keep_previous: first keep the current ``path`` as :func:`previous_path` (only when the caller
            knows that file to be good: a damaged one must not replace a good previous version).

    Raises:
        WriteError: the file system refused the file (a full disk, a quota, no permission); ``path`` and
            its previous version are untouched.
    """
    def keep_checked(tmp):
        verify(tmp)  # what was written reads back whole before it replaces anything
        if keep_previous and os.path.exists(path):
            _keep_as_previous(path)

    atomic_write(lambda f: _write_payload(obj, f), path, before_replace=keep_checked)


def atomic_write(write, path, *, before_replace=None):
    """Writes a file atomically: ``write(f)`` fills a temporary binary file in the same folder, which is
    flushed to disk and renamed over ``path``; on any failure (a full disk) it is removed and ``path``
    is untouched, so no empty or partial file is left.

    Args:
        write: function of one argument, the open binary file, that writes the content.
        path: destination file.
        before_replace: function of the temporary file's path, called once it is on disk and before it
            replaces ``path`` (a check of what was written; raising leaves ``path`` untouched), or None.

    Raises:
        WriteError: the file system refused the file; ``path`` is untouched.
    """
    with _writing(path):
        fd, tmp = _temporary(path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(tmp)
            _replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_write_text(text, path):
    """Writes a text file atomically (see :func:`atomic_write`).

    Args:
        text: the content.
        path: destination file.
    """
    atomic_write(lambda f: f.write(text.encode()), path)


def remove_stale_temporaries(folder):
    """Removes the temporary files that a killed writer left in ``folder`` (call it while owning the folder).

    Args:
        folder: a run folder.

    Returns:
        list of str: the removed files.
    """
    removed = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if _TEMPORARY.match(name):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def _zip_end(f, size):
    """Where the zip archive that ``torch.save`` wrote ends in ``f`` (after its end-of-central-directory record).

    Returns:
        int or None: the offset, or None when no such record lies near the end (not a zip, or cut short).
    """
    start = max(0, size - (_EOCD_SEARCH + _TRAILER.size))
    f.seek(start)
    tail = f.read()
    pos = tail.rfind(_EOCD)
    if pos < 0 or pos + 22 > len(tail):
        return None
    (comment,) = struct.unpack("<H", tail[pos + 20:pos + 22])
    return start + pos + 22 + comment


def verify(path):
    """Checks ``path``'s checksum trailer (the one :func:`atomic_save` appends).

    Args:
        path: the file.

    Returns:
        bool: True when the file carries a trailer that matches, False when it carries none (a plain
        ``torch.save`` file, or not a zip at all: ``torch.load`` then says what it is).

    Raises:
        CheckpointError: an empty file, or one whose trailer is damaged or does not match its content.
        OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(path, "is empty (0 bytes)")
    with open(path, "rb") as f:
        magic = length = digest = None
        if size >= _TRAILER.size:
            f.seek(size - _TRAILER.size)
            magic, length, digest = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != _MAGIC:
            end = _zip_end(f, size)
            if end is None or end == size:
                return False
            raise CheckpointError(path, f"is damaged: {size - end} bytes follow its data where a "
                                        f"{_TRAILER.size}-byte checksum record belongs (cut short or appended to)")
        if length != size - _TRAILER.size:
            raise CheckpointError(path, f"is damaged: it holds {size - _TRAILER.size} bytes of data where its "
                                        f"checksum record says {length} (truncated or appended to)")
        f.seek(0)
        sha, left = hashlib.sha256(), length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise CheckpointError(path, "is truncated (shorter than its checksum record)")
            sha.update(chunk)
            left -= len(chunk)
    if sha.digest() != digest:
        raise CheckpointError(path, "is corrupt: its SHA-256 does not match the one written with it")
    return True


def _first_line(error):
    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def read(path, map_location="cpu"):
    """Loads a checkpoint and says whether its checksum was verified.

    Args:
        path: the file.
        map_location: passed to ``torch.load``.

    Returns:
        tuple: (the loaded object, True when a checksum was verified / False for a file without one).

    Raises:
        CheckpointError: the file is empty, truncated, corrupt or not a torch checkpoint.
        OSError: the file is missing or unreadable.
    """
    verified = verify(path)
    try:
        # Checkpoints hold numpy and python RNG states, which the weights-only unpickler refuses.
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch.load raises many types (RuntimeError, UnpicklingError, EOFError, ...)
        if verified:
            raise CheckpointError(path, f"passed its checksum but cannot be loaded ({_first_line(error)})") from error
        raise CheckpointError(path, f"is not a fastabsld checkpoint, or is truncated ({_first_line(error)})") \
            from error
    return obj, verified


def load(path, map_location="cpu"):
    """Loads a checkpoint written by :func:`atomic_save`, verifying its checksum (see :func:`read`).

    Args:
        path: the file.
        map_location: passed to ``torch.load``.

    Returns:
        the checkpoint (a dict for the recipe's checkpoints).

    Raises:
        CheckpointError: the file is empty, truncated, corrupt or not a torch checkpoint.
        OSError: the file is missing or unreadable.
    """
    return read(path, map_location)[0]


def load_latest(path, map_location="cpu", *, accept=None):
    """Loads ``path``, or its previous version when ``path`` is missing, damaged or not accepted.

    Args:
        path: the checkpoint (``last.pt``).
        map_location: passed to ``torch.load``.
        accept: optional ``state -> problem or None``: a further check of a loaded checkpoint (a returned
            string rejects it, phrased to follow the file name).

    Returns:
        tuple: (state, the path it came from, verified, list of CheckpointError for the files passed over),
        or None when neither file exists.

    Raises:
        CheckpointError: files exist but none is usable (the message names each and its problem).
    """
    problems = []
    for candidate in (path, previous_path(path)):
        if not os.path.exists(candidate):
            continue
        try:
            state, verified = read(candidate, map_location)
            if not isinstance(state, dict):
                raise CheckpointError(candidate, f"is not a fastabsld checkpoint (it holds a {type(state).__name__})")
            problem = accept(state) if accept else None
            if problem:
                raise CheckpointError(candidate, problem)
        except CheckpointError as error:
            problems.append(error)
            continue
        return state, candidate, verified, problems
    if not problems:
        return None
    if len(problems) == 1:
        raise problems[0]
    raise CheckpointError(path, "and its previous version are unusable: " + "; ".join(map(str, problems)))


def rng_state(generators=None):
    """Captures the global RNG states (python, numpy, torch CPU, CUDA if any) and named generators.

    Args:
        generators: optional dict name -> torch.Generator (data order, attack noise...).

    Returns:
        dict: picklable states for :func:`set_rng_state`.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    return state


def set_rng_state(state, generators=None):
    """Restores states captured by :func:`rng_state`.

    Args:
        state: the dict from :func:`rng_state`.
        generators: dict name -> torch.Generator to restore in place (same names as when captured).
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint holds no state for generator {name!r}")
        gen.set_state(state["generators"][name])
