"""The errors a training run reports as one line: a locked run folder, an unreadable checkpoint, a non-finite loss,
a file the disk refused, a resume with another teacher.

Each carries the exit status the command line returns for it, so that ``fastabsld train`` can turn
any of them into an ``error:`` line without knowing which one it is.
"""

import errno

# errno values of a full disk or an exhausted quota.
DISK_FULL = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name))


class RecipeError(Exception):
    """A failure of a run that the command line reports as one ``error:`` line.

    Attributes:
        exit_status: the command line's exit status for it.
    """

    exit_status = 1


class CheckpointError(RecipeError, ValueError):
    """A checkpoint file that cannot be used: empty, truncated, corrupt (checksum mismatch) or not a checkpoint.

    A ValueError too, so that code catching the unpickling errors of ``torch.load`` as ValueError keeps
    catching it.

    Attributes:
        path: the file.
        problem: what is wrong with it, phrased to follow the file name ("is truncated ...").
    """

    exit_status = 2

    def __init__(self, path, problem):
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem

    def __reduce__(self):  # picklable (rank 0 hands it to the other ranks under torchrun)
        return type(self), (self.path, self.problem)


class RunLockedError(RecipeError):
    """The run folder is in use by another live process.

    Attributes:
        run_dir: the folder.
        holder: the holder's record (``{"pid", "host", "since"}``), or None when it could not be read.
    """

    exit_status = 2

    def __init__(self, run_dir, holder):
        if holder:
            who = f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
        else:
            who = "another process (it is starting; its pid is not written yet)"
        super().__init__(f"{run_dir} is in use by {who}; wait for that run to end or choose another run folder")
        self.run_dir = run_dir
        self.holder = holder


class NonFiniteLossError(RecipeError):
    """The training loss (or the model's state) became NaN or infinite; the run stopped.

    Attributes:
        epoch: the 1-based epoch in which it happened.
    """

    exit_status = 1

    def __init__(self, message, epoch):
        super().__init__(message)
        self.epoch = epoch


class WriteError(RecipeError, OSError):
    """A run file that the file system refused to take (a full disk, a quota, a read-only folder).

    The file is written atomically, so what was there before is untouched: free space and resume.
    An OSError too (with the original ``errno``), for code that catches the file system's errors.

    Attributes:
        path: the file.
        reason: the file system's words (``No space left on device``).
    """

    exit_status = 2

    def __init__(self, path, error):
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(error.errno, reason)
        self.path, self.reason, self.error = path, reason, error

    def __str__(self):
        hint = "; free some space, then resume" if self.errno in DISK_FULL else ""
        return f"cannot write {self.path}: {self.reason}; the files there before are untouched{hint}"

    def __reduce__(self):  # picklable (rank 0 hands errors to the other ranks under torchrun)
        return type(self), (self.path, self.error)



class TeacherChangedError(RecipeError):
    """A resumed run whose teacher's weights differ from those its checkpoint was distilled from.

    Attributes:
        recorded: the checkpoint's teacher record (``weights_sha256``, and ``path`` for a file).
        current: the record of the teacher loaded now.
    """

    exit_status = 2

    def __init__(self, run_dir, recorded, current):
        def described(record):
            where = record.get("path") or record.get("name") or record.get("source") or "a teacher"
            return f"{where} (weights SHA-256 {record.get('weights_sha256')})"

        super().__init__(f"--resume: {run_dir} was distilled from the teacher {described(recorded)}, but the teacher "
                         f"now is {described(current)}; bring back the run's teacher, or pass "
                         "--accept-teacher-change (train(..., accept_teacher_change=True)) to go on distilling from "
                         "this one (metrics.json records the change)")
        self.run_dir, self.recorded, self.current = run_dir, recorded, current

    def __reduce__(self):
        return type(self), (self.run_dir, self.recorded, self.current)
