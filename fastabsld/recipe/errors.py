"""The errors a training run reports as one line: a locked run folder, an unreadable checkpoint, a non-finite loss.

Each carries the exit status the command line returns for it, so that ``fastabsld train`` can turn
any of them into an ``error:`` line without knowing which one it is.
"""


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
