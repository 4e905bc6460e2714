"""Compare's runs as SLURM jobs, through submitit: a job array, the teacher as a job the array waits for.

Each (method spec, seed) run is one task of a job array; it trains (or resumes) the same run folder a local
run would, with compare's own training function, so the figures do not depend on where a run trained. When
the shared teacher is neither given nor cached, a job of its own trains and caches it first and the array
depends on it (``afterok``; a failed teacher cancels the runs). Every submitted job is recorded in
``<out>/slurm/jobs.json``, so a later call finds the jobs again: it waits for the ones still queued or
running, reads the finished runs, and names the failed ones with the last lines of their stderr.

Preemption and time limits: the jobs are checkpointable in submitit's sense. SLURM signals a job
(``USR2``) before its time limit or on preemption; submitit then requeues the same call, and the run
resumes from its ``last.pt`` as a local ``--resume`` does (bit for bit the uninterrupted run's figures;
only the epoch in progress is trained again). A job cancelled outright (``scancel``) is reported as
failed; ``resubmit`` submits it again and it resumes the same way.

The cluster is whatever ``sbatch`` reaches; the folders (the runs, the teacher cache, the SLURM logs)
must be on a file system the nodes share.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

from fastabsld.study.launchers import Launcher, local_teacher

JOBS_FILE = "jobs.json"
SLURM_FOLDER = "slurm"
# Job states (sacct's first word; submitit's local executor's for tests) of a job that has not ended.
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"})
WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                            "PREEMPTED", "READY", "UNKNOWN"})
STDERR_LINES = 15
# The jobs submitted by this process, by id: a local job's state is known only to the object that started it.
_SUBMITTED = {}


@dataclass(frozen=True)
class SlurmOptions:
    """What each job asks of the cluster.

    Attributes:
        partition: the partition (None: the cluster's default).
        gpus_per_run: GPUs of each run's job (0: none requested).
        cpus_per_run: CPUs of each run's job (also its torch threads).
        mem_gb: memory of each job in GB (None: the partition's default).
        time_min: time limit of each job in minutes; a run reaching it is requeued and resumes.
        account: the account to charge (None: the user's default).
        qos: the quality of service (None: the default).
        array_parallelism: runs of the array running at once (0: as many as the cluster gives).
        sbatch: further sbatch options, ``{"constraint": "a100", ...}`` (written as ``--key=value``).
        logs: the folder of the jobs' logs and submitit's files (None: ``<out>/slurm``).
        max_requeues: times a job is requeued after reaching its time limit (preemptions do not count).
        signal_delay_s: seconds before the time limit at which SLURM signals a job to requeue itself.
    """

    partition: str = None
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    mem_gb: float = None
    time_min: int = 24 * 60
    account: str = None
    qos: str = None
    array_parallelism: int = 0
    sbatch: dict = dataclasses.field(default_factory=dict)
    logs: str = None
    max_requeues: int = 3
    signal_delay_s: int = 120

    def __post_init__(self):
        for name, low in (("gpus_per_run", 0), ("cpus_per_run", 1), ("time_min", 1), ("array_parallelism", 0),
                          ("max_requeues", 0), ("signal_delay_s", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SlurmOptions.{name} must be an integer >= {low}, got {value!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0):
            raise ValueError(f"SlurmOptions.mem_gb must be a positive number of GB, got {self.mem_gb!r}")
        for name in ("partition", "account", "qos", "logs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"SlurmOptions.{name} must be a non-empty string or None, got {value!r}")
        if not isinstance(self.sbatch, dict) or not all(isinstance(k, str) and k for k in self.sbatch):
            raise ValueError(f"SlurmOptions.sbatch must map sbatch option names to values, got {self.sbatch!r}")


def parse_sbatch_option(text):
    """One extra sbatch option from ``KEY=VALUE`` (``--`` before the key is allowed): ``(key, value)``.

    Args:
        text: e.g. ``"constraint=a100"`` or ``"--exclusive="``.

    Returns:
        tuple: (key, value); an empty value passes the option without one.

    Raises:
        ValueError: no ``=`` or no key.
    """
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ValueError(f"an sbatch option is KEY=VALUE (e.g. constraint=a100), got {text!r}")
    return key, value


class RunJob:
    """A run as a job: compare's training function on one run, checkpointable in submitit's sense.

    Args:
        train_run: ``train_run(fields, run_dir, threads, data, teacher_info) -> (test, seconds)``.
    """

    def __init__(self, train_run):
        self.train_run = train_run

    def __call__(self, fields, run_dir, threads, teacher_info):
        """Trains (or resumes) the run; returns (test evaluation, seconds)."""
        return self.train_run(fields, run_dir, threads, None, teacher_info)

    def checkpoint(self, *args, **kwargs):
        """On preemption or time limit: the same call, requeued (the run resumes from its last.pt)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


class TeacherJob(RunJob):
    """The shared teacher as a job: trained into the cache (resumed from its own run folder when requeued)."""

    def __init__(self):
        super().__init__(None)

    def __call__(self, fields):
        """Trains and caches the teacher of the base config ``fields``; returns its description."""
        from fastabsld.recipe.config import TrainConfig
        from fastabsld.recipe.teacher import teacher_and_info

        return teacher_and_info(TrainConfig(**fields), log=lambda line: print(line, flush=True))[1]


def _run_name(key):
    return f"{key[0]}-seed{key[1]}"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path, lines=STDERR_LINES):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


class SlurmLauncher(Launcher):
    """Submits compare's runs to SLURM through submitit, waits for them or leaves them, collects them.

    Args:
        out_dir: the comparison's folder (the jobs are recorded in ``<out_dir>/slurm/jobs.json``).
        options: SlurmOptions.
        wait: wait for the jobs and yield the runs as they end (False: submit, show states, return).
        collect: submit nothing; find the recorded jobs, wait for those still running (when ``wait``), read.
        resubmit: submit again the runs whose job failed or was never submitted (and a failed teacher job).
            Without it (and without ``collect``) only runs never submitted are submitted: a run whose job
            failed is named, not retried.
        collect_command: the command that collects later (shown on ``wait=False``, on Ctrl-C and with failures).
        poll_s: seconds between two looks at the jobs' states.
        cluster: submitit's executor: ``"slurm"``, or ``"local"`` (jobs as local processes: for tests).
        log: function printing one-line messages (default: the recipe's).
    """

    name = "slurm"

    def __init__(self, out_dir, options=None, *, wait=True, collect=False, resubmit=False, collect_command=None,
                 poll_s=10.0, cluster="slurm", log=None):
        from fastabsld.recipe import logs

        if collect and resubmit:
            raise ValueError("collect submits nothing and resubmit submits the failed runs: choose one")
        if cluster not in ("slurm", "local"):
            raise ValueError(f"cluster must be 'slurm' or 'local', got {cluster!r}")
        if not (isinstance(poll_s, (int, float)) and poll_s > 0):
            raise ValueError(f"poll_s must be a positive number of seconds, got {poll_s!r}")
        self.options = options or SlurmOptions()
        self.out_dir, self.wait, self.collect, self.resubmit = out_dir, wait, collect, resubmit
        self.poll_s, self.cluster, self.log = poll_s, cluster, log or logs.info
        self.collect_command = collect_command or (
            f"compare(out_dir={out_dir!r}, ..., launcher=SlurmLauncher({out_dir!r}, collect=True))")
        self.folder = os.path.join(out_dir, SLURM_FOLDER)
        self.logs = self.options.logs or self.folder
        self.failures = {}  # key -> lines reporting the failure
        self._teacher_job = None

    # The record of submitted jobs.

    def _records_path(self):
        return os.path.join(self.folder, JOBS_FILE)

    def _records(self):
        try:
            with open(self._records_path()) as f:
                records = json.load(f)
        except FileNotFoundError:
            return {"runs": {}, "teacher": None}
        except ValueError as error:
            raise ValueError(f"{self._records_path()} is not readable JSON ({error}); remove it to forget the "
                             "jobs it recorded") from None
        return {"runs": records.get("runs") or {}, "teacher": records.get("teacher")}

    def _record(self, runs=None, teacher=None):
        records = self._records()
        records["runs"].update(runs or {})
        if teacher is not None:
            records["teacher"] = teacher
        os.makedirs(self.folder, exist_ok=True)
        tmp = self._records_path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, self._records_path())

    # Jobs through submitit.

    def _submitit(self):
        try:
            import submitit
        except ImportError:
            raise ImportError("the slurm launcher needs submitit: pip install 'fastabsld[slurm]' (or submitit)") \
                from None
        return submitit

    def _executor(self, name, dependency=None):
        submitit = self._submitit()
        o = self.options
        executor = submitit.AutoExecutor(folder=self.logs, cluster=self.cluster, slurm_max_num_timeout=o.max_requeues)
        extra = {**o.sbatch}
        if dependency:
            extra.update({"dependency": f"afterok:{dependency}", "kill-on-invalid-dep": "yes"})
        params = dict(name=name, timeout_min=o.time_min, nodes=1, tasks_per_node=1, cpus_per_task=o.cpus_per_run,
                      slurm_signal_delay_s=o.signal_delay_s, slurm_additional_parameters=extra)
        if o.array_parallelism:
            params["slurm_array_parallelism"] = o.array_parallelism
        if o.gpus_per_run:
            params["gpus_per_node"] = o.gpus_per_run
        if o.mem_gb:
            params["mem_gb"] = o.mem_gb
        for key, value in (("slurm_partition", o.partition), ("slurm_account", o.account), ("slurm_qos", o.qos)):
            if value:
                params[key] = value
        executor.update_parameters(**params)
        return executor

    def _attach(self, record):
        """The submitit job of a record ``{"job", "logs", "cluster"}`` (the very object when submitted here)."""
        if str(record["job"]) in _SUBMITTED:
            return _SUBMITTED[str(record["job"])]
        submitit = self._submitit()
        job_class = submitit.SlurmJob if record.get("cluster", "slurm") == "slurm" else submitit.LocalJob
        return job_class(folder=record["logs"], job_id=str(record["job"]))

    def _record_of(self, job):
        _SUBMITTED[job.job_id] = job
        return {"job": job.job_id, "logs": os.path.abspath(self.logs), "cluster": self.cluster}

    def _refresh(self, jobs):
        """One sacct call for all the jobs (submitit's watcher otherwise polls at its own pace)."""
        slurm_job = self._submitit().SlurmJob
        watchers = {id(job.watcher): job.watcher for job in jobs if isinstance(job, slurm_job)}
        for watcher in watchers.values():
            watcher.update()

    @staticmethod
    def state(job):
        """The job's state: ``(category, word)``, category ``pending`` / ``running`` / ``ended``.

        Args:
            job: a submitit Job.

        Returns:
            tuple: e.g. ``("running", "RUNNING")``, ``("ended", "CANCELLED")``; a job that wrote its result
            has ended whatever the scheduler says yet.
        """
        word = (job.state or "UNKNOWN").split()[0].upper()
        if job.paths.result_pickle.exists():
            return "ended", word
        if word == "NO":  # a local job found again by another process: "NO PROCESS AND NO RESULT"; its id is a pid
            return ("running", "RUNNING") if _pid_alive(int(job.job_id)) else ("ended", "LOST")
        if word in RUNNING_STATES:
            return "running", word
        if word in WAITING_STATES:
            return "pending", word
        return "ended", word

    def _outcome(self, job, word):
        """``(value, None)`` for a job that returned, ``(None, reason)`` for one that failed."""
        if job.paths.result_pickle.exists():
            from submitit.core.utils import pickle_load

            outcome, value = pickle_load(job.paths.result_pickle)  # what job.result() reads
            if outcome == "success":
                return value, None
            lines = [line for line in str(value).splitlines() if line.strip()]  # the job's traceback
            return None, f"it raised {lines[-1].strip() if lines else outcome}"
        return None, f"ended {word} without a result"

    def _failure(self, what, job, reason, folder=None):
        """Lines naming a failed job: what, the job, why, its run folder and its stderr's last lines."""
        place = f", run folder {folder}" if folder else ""
        lines = [f"{what} (job {job.job_id}) failed: {reason}{place}"]
        tail = _tail(job.paths.stderr)
        if tail:
            lines.append(f"  last lines of its stderr ({job.paths.stderr}):")
            lines += [f"    | {line}" for line in tail]
        return lines

    # The launcher's interface.

    def teacher(self, base, data, pending, log):
        """The cached (or given) teacher, or (None, None) after submitting (or finding) the job that trains it."""
        from fastabsld.recipe.config import DISTILLATION_METHODS
        from fastabsld.recipe.teacher import teacher_cache_path

        distilling = [p for p in pending if p[1].method in DISTILLATION_METHODS]
        if base.teacher_path or not distilling or os.path.exists(teacher_cache_path(base, data)):
            return local_teacher(base, data, log)
        record = self._records()["teacher"]
        job = self._attach(record) if record else None
        if job is not None:
            self._refresh([job])
            category, word = self.state(job)
            if category != "ended" or not (self.resubmit or self._outcome(job, word)[1] is None):
                self._teacher_job = job  # still running, or failed and not to be retried (reported below)
                return None, None
        if self.collect:
            self._teacher_job = job
            return None, None
        executor = self._executor(f"fastabsld-teacher-{base.dataset}")
        self._teacher_job = executor.submit(TeacherJob(), base.to_dict())
        self._record(teacher=self._record_of(self._teacher_job))
        log(f"submitted the teacher's training as job {self._teacher_job.job_id}; the runs wait for it")
        return None, None

    def train(self, pending, train_run, data, teacher_info, log):
        """Submits the pending runs not yet on the cluster; yields the runs as their jobs end (see the class)."""
        records = self._records()["runs"]
        jobs, to_submit = {}, []
        known = {key: self._attach(records[_run_name(key)]) for key, _, _ in pending if _run_name(key) in records}
        self._refresh(list(known.values()))
        for key, cfg, folder in pending:
            job = known.get(key)
            if job is not None and self.state(job)[0] != "ended":
                jobs[key] = job  # still queued or running: waited for, not submitted twice
            elif self.resubmit or (job is None and not self.collect):
                to_submit.append((key, cfg, folder))
            elif job is None:
                self.failures[key] = [f"{key[0]} seed {key[1]}: no job was submitted for it (run folder {folder})"]
            else:
                jobs[key] = job  # ended: its outcome is read below (a failure is reported, not retried)
        teacher = self._teacher_job
        if to_submit and teacher is not None and self._failed(teacher):
            # The runs that distil would train the teacher each on its own: they wait for a resubmit instead.
            from fastabsld.recipe.config import DISTILLATION_METHODS

            for key, cfg, folder in to_submit:
                if cfg.method in DISTILLATION_METHODS:
                    self.failures[key] = [f"{key[0]} seed {key[1]}: not submitted, the teacher's job failed "
                                          f"(run folder {folder})"]
            to_submit = [entry for entry in to_submit if entry[0] not in self.failures]
        if to_submit:
            jobs.update(self._submit(to_submit, train_run, teacher_info, log))
        folders = {key: folder for key, _, folder in pending}
        if not self.wait:
            self._refresh(list(jobs.values()) + ([teacher] if teacher else []))
            done = set()
            for key, test, seconds in self._ended(jobs, folders, teacher):
                done.add(key)
                yield key, test, seconds
            self._show_once(jobs, teacher, done, log)
            return
        try:
            yield from self._wait(jobs, folders, teacher, log)
        except KeyboardInterrupt:
            log(f"stopped waiting; the jobs keep running on the cluster. Collect them with: {self.collect_command}")
            raise

    def _submit(self, to_submit, train_run, teacher_info, log):
        teacher = self._teacher_job
        dependency = teacher.job_id if teacher is not None and self.state(teacher)[0] != "ended" else None
        executor = self._executor(f"fastabsld-{os.path.basename(os.path.abspath(self.out_dir))}", dependency)
        threads = self.options.cpus_per_run
        submitted = executor.map_array(RunJob(train_run), [cfg.to_dict() for _, cfg, _ in to_submit],
                                       [os.path.abspath(folder) for _, _, folder in to_submit],
                                       [threads] * len(to_submit),
                                       [teacher_info] * len(to_submit))
        jobs = {key: job for (key, _, _), job in zip(to_submit, submitted)}
        self._record(runs={_run_name(key): self._record_of(job) for key, job in jobs.items()})
        array = submitted[0].job_id.split("_")[0]
        log(f"submitted {len(jobs)} run{'s' if len(jobs) != 1 else ''} as job array {array}"
            f"{f' (after job {dependency})' if dependency else ''}; SLURM logs in {self.logs}")
        return jobs

    def _failed(self, job):
        """Whether the job ended without a result (the reason kept for the teacher's job in ``failures``)."""
        category, word = self.state(job)
        reason = self._outcome(job, word)[1] if category == "ended" else None
        if reason and job is self._teacher_job:
            self.failures["teacher"] = self._failure("the teacher's training", job, reason)
        return bool(reason)

    def _ended(self, jobs, folders, teacher, seen=()):
        """Yields (key, test, seconds) of the jobs that returned, records the failed ones; skips ``seen``."""
        if teacher is not None and "teacher" not in self.failures:
            self._failed(teacher)
        for key, job in jobs.items():
            if key in seen or key in self.failures:
                continue
            category, word = self.state(job)
            if category != "ended":
                continue
            value, reason = self._outcome(job, word)
            if reason:
                self.failures[key] = self._failure(f"{key[0]} seed {key[1]}", job, reason, folders[key])
            else:
                yield key, value[0], value[1]

    def _counts(self, jobs, teacher, done):
        """The runs per state; ``done``: the runs read already (a job that ended since counts as running)."""
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        for key, job in jobs.items():
            category = "done" if key in done else "failed" if key in self.failures else self.state(job)[0]
            counts["running" if category == "ended" else category] += 1
        text = "runs: " + ", ".join(f"{n} {word}" for word, n in counts.items())
        if teacher is not None:
            text = f"teacher {'failed' if 'teacher' in self.failures else self.state(teacher)[1].lower()}; {text}"
        return counts, text

    def _show_once(self, jobs, teacher, done, log):
        counts, text = self._counts(jobs, teacher, done)
        ids = sorted({job.job_id.split("_")[0] for job in jobs.values()})
        log(f"jobs {', '.join(ids) or 'none'}: {text}")
        if counts["done"] + counts["failed"] < len(jobs):
            log(f"not waiting; collect the runs later with: {self.collect_command}")

    def _wait(self, jobs, folders, teacher, log):
        """Polls the jobs until all ended; shows their states (a bar on a terminal, else a line per change)."""
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="SLURM runs", unit="run", file=sys.stderr)
        seen, shown = set(), None
        try:
            while True:
                self._refresh(list(jobs.values()) + ([teacher] if teacher else []))
                for key, test, seconds in self._ended(jobs, folders, teacher, seen):
                    seen.add(key)
                    yield key, test, seconds
                counts, text = self._counts(jobs, teacher, seen)
                if bar is not None:
                    bar.n = counts["done"] + counts["failed"]
                    bar.set_postfix_str(text)
                elif text != shown:
                    log(f"{time.strftime('%H:%M:%S')} {text}")
                shown = text
                if counts["done"] + counts["failed"] == len(jobs):
                    return
                time.sleep(self.poll_s)
        finally:
            if bar is not None:
                bar.close()

    def unfinished(self, keys, log):
        """Names the failed runs (raising) or, when none failed, says what runs on and how to collect it.

        Args:
            keys: the runs that did not end here.
            log: function printing one-line messages.

        Returns:
            dict: ``{"unfinished": [run names], "jobs": {run name: job id}, "collect": command}``.

        Raises:
            ValueError: some runs failed (each reported above with its stderr's last lines).
        """
        failed = [key for key in self.failures if key == "teacher" or key in keys]
        for key in failed:
            for line in self.failures[key]:
                log(line)
        if failed:
            names = [k if k == "teacher" else f"{k[0]} seed {k[1]}" for k in failed]
            raise ValueError(f"{len(names)} job{'s' if len(names) != 1 else ''} failed ({', '.join(names)}; "
                             f"reported above); submit them again with: {self._resubmit_command()}")
        records = self._records()["runs"]
        return {"unfinished": [_run_name(key) for key in keys], "collect": self.collect_command,
                "jobs": {_run_name(key): records.get(_run_name(key), {}).get("job") for key in keys}}

    def _resubmit_command(self):
        command = self.collect_command
        return command.replace("--collect", "--resubmit") if "--collect" in command else \
            command.replace("collect=True", "resubmit=True")
