"""Where a study's runs train: this process or worker processes of this machine (local), or SLURM jobs.

A launcher gives ``compare`` three things: the teacher every distilling run shares (trained or read from the
cache before the runs, or by a job of its own), the pending runs trained (yielding each one's test
evaluation as it ends), and a word on the runs that did not end (submitted without waiting, or failed).
:class:`LocalLauncher` is compare's default; :class:`fastabsld.study.slurm.SlurmLauncher` submits the runs
as a SLURM job array through submitit.

A run is trained by compare's own function ``train_run(fields, run_dir, threads, data, teacher_info)``
returning ``(test evaluation, seconds)``, whichever launcher runs it, so both write the same run folders.
"""

def local_teacher(base, data, log):
    """The shared teacher trained here (or read from the cache), with its validation figures computed once.

    Args:
        base: the base TrainConfig of the study.
        data: the data set's Splits.
        log: function printing one-line messages.

    Returns:
        tuple: (the teacher module, its description for each run's metrics.json: source, path, ``val`` figures).
    """
    from fastabsld.recipe.teacher import teacher_and_info
    from fastabsld.recipe.train import teacher_report

    teacher, info = teacher_and_info(base, data=data, log=log)
    info["val"] = teacher_report(teacher, data, base)
    return teacher, info


class Launcher:
    """What compare asks of a launcher (see the module docstring)."""

    name = "launcher"

    def teacher(self, base, data, pending, log):
        """The teacher the distilling runs share, or None when a job of the launcher trains it.

        Args:
            base: the base TrainConfig.
            data: the data set's Splits.
            pending: the runs still to train, ``[(key, cfg, folder)]`` (none: the teacher is only described).
            log: function printing one-line messages.

        Returns:
            tuple: (teacher module, its description), or (None, None) when a job the runs wait for trains it
            (ask again once they ended).
        """
        return local_teacher(base, data, log)

    def train(self, pending, train_run, data, teacher_info, log):
        """Trains the pending runs; yields ``(key, test evaluation, seconds)`` as each ends.

        Args:
            pending: ``[(key, cfg, folder)]`` with key ``(spec name, seed)``.
            train_run: compare's function training one run (see the module docstring).
            data: the data set's preloaded Splits (for runs trained in this process).
            teacher_info: the description from :meth:`teacher` (None: the runs find the teacher in the cache).
            log: function printing one-line messages.
        """
        raise NotImplementedError

    def unfinished(self, keys, log):
        """What compare returns when ``keys`` did not end (only launchers that may leave runs behind).

        Args:
            keys: the unfinished runs' keys.
            log: function printing one-line messages.

        Returns:
            dict: what the launcher left behind and how to collect it.
        """
        raise RuntimeError(f"the {self.name} launcher left runs unfinished without an error: {keys}")


class LocalLauncher(Launcher):
    """Runs on this machine: one after the other in this process, or ``jobs`` spawned worker processes.

    Args:
        jobs: runs trained at once (1: in this process, on the preloaded data).
        threads: torch CPU threads per run (0: torch's choice).
    """

    name = "local"

    def __init__(self, jobs=1, threads=1):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
        self.jobs, self.threads = jobs, threads

    def train(self, pending, train_run, data, teacher_info, log=None):
        """See :meth:`Launcher.train`; an exception of a run ends the others (not started ones are cancelled)."""
        if self.jobs == 1 or len(pending) <= 1:
            for key, cfg, folder in pending:
                test, seconds = train_run(cfg.to_dict(), folder, self.threads, data, teacher_info)
                yield key, test, seconds
            return
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(self.jobs, len(pending)),
                                                    mp_context=context) as pool:
            futures = {pool.submit(train_run, cfg.to_dict(), folder, self.threads, None, teacher_info): key
                       for key, cfg, folder in pending}
            try:
                for future in concurrent.futures.as_completed(futures):
                    test, seconds = future.result()
                    yield futures[future], test, seconds
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

