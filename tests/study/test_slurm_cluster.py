"""compare on a real SLURM cluster (``make test-slurm`` starts a single-node one with scripts/slurm_cluster.sh).

Each test runs ``fastabsld compare --launcher slurm`` as a user does, in a process of its own, and holds its
runs against the same runs trained by the local launcher: the same figures and, bit for bit, the same final
weights, also after a job was cancelled and resubmitted or preempted and requeued. Without ``sbatch`` on
the PATH, or with no controller answering, the tests skip and say why; ``FASTABSLD_SLURM_REQUIRED=1`` (set
by ``make test-slurm``) turns that into a failure.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from fastabsld.recipe import checkpoint
from fastabsld.study.compare import compare
from fastabsld.study.slurm import JOBS_FILE, SLURM_FOLDER
from tests.study.launch_helpers import assert_same_runs

REQUIRED = os.environ.get("FASTABSLD_SLURM_REQUIRED") == "1"
# The study of the equality test: 2 specs x 2 seeds, digits, 2 epochs, a teacher trained by a job of its own.
STUDY = ["trades", "rslad", "--seeds", "0", "1", "--reference", "rslad", "--attacks", "clean", "fgsm"]
BUDGET = ["--epochs", "2", "--batch-size", "64", "--steps", "1", "--eval-every", "1", "--val-attacks", "clean",
          "--select-metric", "clean.average", "--teacher-model", "cnn-s", "--teacher-epochs", "1"]
# One longer run (10 PGD steps: about a second an epoch or more here) to cancel or preempt in the middle,
# long enough to outlast the 2 s between scancel's SIGTERM and its SIGKILL; it needs no teacher.
LONG = ["trades", "--seeds", "0", "--reference", "trades", "--attacks", "clean", "--epochs", "12",
        "--batch-size", "64", "--steps", "10", "--eval-every", "1", "--val-attacks", "clean",
        "--select-metric", "clean.average"]
TIMEOUT_S = 600


def _unavailable():
    """Why no SLURM cluster can be used here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch on the PATH (make test-slurm starts a single-node SLURM cluster and runs these tests)"
    for command in (["sinfo", "-h", "-o", "%t"], ["sacct", "-n", "-X", "-S", "now"]):
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=20)
        except (subprocess.SubprocessError, OSError):
            return (f"'{' '.join(command)}' gets no answer from a SLURM cluster with accounting (start one with "
                    "scripts/slurm_cluster.sh start and set SLURM_CONF, or run make test-slurm)")
    return None


REASON = _unavailable()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(REASON) and not REQUIRED, reason=str(REASON))]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if REASON:
        pytest.fail(f"FASTABSLD_SLURM_REQUIRED=1 but {REASON}")


def _fastabsld(*args, check=True):
    """Runs ``python -m fastabsld ARGS`` as a user would; returns (exit status, its output)."""
    done = subprocess.run([sys.executable, "-m", "fastabsld", *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = done.stdout + done.stderr
    if check:
        assert done.returncode == 0, output
    return done.returncode, output


def _result(out):
    with open(os.path.join(out, "compare.json")) as f:
        return json.load(f)


def _job_id(out, run):
    with open(os.path.join(out, SLURM_FOLDER, JOBS_FILE)) as f:
        return json.load(f)["runs"][run]["job"]


def _sacct(job):
    """sacct's states of the job, every record of it (a requeued job has one per start)."""
    done = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job, "-o", "State"], capture_output=True,
                          text=True, check=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _wait_for_epoch(run_dir, epoch, job):
    """Waits until the run saved ``epoch`` in its last.pt (and has not finished)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            saved = checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"]
        except (OSError, ValueError):
            saved = 0
        if saved >= epoch:
            return saved
        assert _sacct(job)[-1:] != ["FAILED"], f"job {job} failed"
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} saved no epoch {epoch} within {TIMEOUT_S} s")


def _wait_for_state(job, state):
    deadline = time.monotonic() + 60
    while _sacct(job)[-1:] != [state]:
        assert time.monotonic() < deadline, f"job {job}: {_sacct(job)}, not {state}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study through SLURM (the teacher trained by a job first), then through the local launcher."""
    root = tmp_path_factory.mktemp("study")
    cache = ["--cache-dir", str(root / "cache")]
    slurm_out, local_out = str(root / "slurm"), str(root / "local")
    began = time.perf_counter()
    _, output = _fastabsld("compare", *STUDY, *BUDGET, *cache, "--out", slurm_out, "--launcher", "slurm",
                           "--poll", "1")
    seconds = time.perf_counter() - began
    _fastabsld("compare", *STUDY, *BUDGET, *cache, "--out", local_out, "--jobs", "2")
    return dict(slurm=slurm_out, local=local_out, output=output, seconds=seconds)


def test_slurm_compare_gives_the_local_figures(study):
    assert_same_runs(_result(study["local"]), _result(study["slurm"]), study["local"], study["slurm"])
    output = study["output"]
    assert "submitted the teacher's training as job" in output and "after job" in output
    assert "submitted 4 runs as job array" in output and "runs: 0 pending, 0 running, 4 done, 0 failed" in output
    with open(os.path.join(study["slurm"], SLURM_FOLDER, JOBS_FILE)) as f:
        records = json.load(f)
    assert _sacct(records["teacher"]["job"]) == ["COMPLETED"]
    assert all(_sacct(record["job"]) == ["COMPLETED"] for record in records["runs"].values())


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The long run trained by the local launcher (in this process)."""
    out = str(tmp_path_factory.mktemp("long") / "local")
    return out, compare(out, methods=["trades"], seeds=[0], reference="trades", attacks=["clean"], log=lambda *_: None,
                        config=dict(epochs=12, batch_size=64, steps=10, eval_every=1, val_attacks=("clean",),
                                    select_metric="clean.average"))


def test_cancelled_job_resubmitted_resumes_to_identical_figures(tmp_path, long_reference):
    out = str(tmp_path / "slurm")
    _, output = _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--no-wait")
    assert "collect the runs later with:" in output and output.rstrip().endswith("--collect"), output
    job = _job_id(out, "trades-seed0")
    run_dir = os.path.join(out, "trades-seed0")
    _wait_for_epoch(run_dir, 2, job)
    subprocess.run(["scancel", job], check=True)
    _wait_for_state(job, "CANCELLED")
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} is still on the node a minute after scancel"
        time.sleep(0.5)
    assert checkpoint.load(os.path.join(run_dir, "last.pt"))["epoch"] < 12, "the run ended before it was cancelled"

    status, output = _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--collect", check=False)
    assert status == 2, output
    assert f"trades seed 0 (job {job}) failed: ended CANCELLED without a result, run folder {run_dir}" in output
    assert "error: 1 job failed (trades seed 0; reported above); submit them again with: " in output
    assert output.rstrip().endswith("--resubmit"), output

    _, output = _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--resubmit", "--poll", "1")
    assert "submitted 1 run as job array" in output
    with open(os.path.join(run_dir, "train.log")) as f:
        assert f"resumed {run_dir} after epoch " in f.read()  # not trained again from scratch
    assert_same_runs(long_reference[1], _result(out), long_reference[0], out)


def test_preempted_job_requeues_itself_and_resumes_to_identical_figures(tmp_path, long_reference):
    import submitit

    out = str(tmp_path / "slurm")
    _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--no-wait")
    job = _job_id(out, "trades-seed0")
    _wait_for_epoch(os.path.join(out, "trades-seed0"), 2, job)
    # What SLURM does on preemption (and, with USR2 alone, before a time limit): SIGTERM, then the signal
    # submitit turns into checkpoint-and-requeue.
    submitit.SlurmJob(os.path.join(out, SLURM_FOLDER), job)._interrupt()
    _, output = _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--collect", "--poll", "1")
    assert "runs: 0 pending, 0 running, 1 done, 0 failed" in output
    log = "".join(open(os.path.join(out, SLURM_FOLDER, f"{job}_0_log.{kind}")).read() for kind in ("out", "err"))
    assert "this job is preempted" in log and f"Requeued job {job}" in log, log
    assert _sacct(job) == ["REQUEUED", "COMPLETED"]  # one job, started twice
    with open(os.path.join(out, "trades-seed0", "train.log")) as f:
        assert f"resumed {os.path.join(out, 'trades-seed0')} after epoch " in f.read()
    assert_same_runs(long_reference[1], _result(out), long_reference[0], out)


def test_failed_job_is_reported_with_its_stderr_and_run_folder(tmp_path):
    out = str(tmp_path / "slurm")
    run_dir = os.path.join(out, "trades-seed0")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "last.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    status, output = _fastabsld("compare", *LONG, "--out", out, "--launcher", "slurm", "--poll", "1", check=False)
    assert status == 2, output
    job = _job_id(out, "trades-seed0")
    _wait_for_state(job, "FAILED")  # compare knew it from the job's result file, sacct may take a moment
    assert f"trades seed 0 (job {job}) failed: it raised fastabsld.recipe.errors.CheckpointError" in output
    assert f"run folder {run_dir}" in output and "last lines of its stderr (" in output
    assert "    | fastabsld.recipe.errors.CheckpointError: " in output and "is not a fastabsld checkpoint" in output


def test_the_multi_node_script_trains_one_run_with_torchrun_under_srun(tmp_path):
    """scripts/slurm_train.sbatch on one node with two CPU processes: the README's DDP path under srun."""
    import socket

    with socket.socket() as s:  # a free port for torchrun's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "FASTABSLD_NPROC_PER_NODE": "2", "PYTHON": sys.executable, "FASTABSLD_RDZV_PORT": str(port)}
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "slurm_train.sbatch")
    done = subprocess.run(["sbatch", "--wait", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/%j.out",
                           script, "--method", "pgd-at", "--device", "cpu", "--epochs", "1", "--batch-size", "64",
                           "--train-subset", "128", "--steps", "1", "--eval-every", "1", "--val-attacks", "clean",
                           "--select-metric", "clean.average", "--test-attacks", "clean", "--run-dir", str(run)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    logs = "".join(p.read_text() for p in tmp_path.glob("*.out"))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    with open(run / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["world_size"] == 2 and metrics["test"]["clean"]["average"] >= 0, logs
