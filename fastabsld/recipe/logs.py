"""What a run tells while it runs: one plain line per epoch, progress bars on a terminal only, TensorBoard scalars.

Messages go through the ``logging`` logger ``fastabsld``. The command line attaches its handlers
(:func:`setup`: the console, and a ``--log-file``); a program that configured ``logging`` itself gets
them through its own handlers; one that configured nothing gets them printed, as before.
Progress bars appear only when they were asked for and standard error is a terminal (tqdm's
``disable=None`` rule): a log redirected to a file holds lines, not carriage returns.
"""

import contextlib
import logging
import math
import os
import sys

LOGGER = "fastabsld"
FILE_FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def logger():
    """The recipe's logger (``logging.getLogger("fastabsld")``).

    Returns:
        logging.Logger: the logger.
    """
    return logging.getLogger(LOGGER)


def info(message):
    """Logs one line at INFO on the ``fastabsld`` logger (printed to stdout when ``logging`` is not configured).

    Args:
        message: the line.
    """
    log = logger()
    if log.hasHandlers():
        log.info(message)
    else:
        print(message, flush=True)


def error(message):
    """Logs one line at ERROR on the ``fastabsld`` logger (printed to stderr when ``logging`` is not configured).

    Args:
        message: the line.
    """
    log = logger()
    if log.hasHandlers():
        log.error(message)
    else:
        print(message, file=sys.stderr, flush=True)


class _BelowError(logging.Filter):
    def filter(self, record):
        return record.levelno < logging.ERROR


class _LogFile(logging.FileHandler):
    """A FileHandler that, when a line cannot be written (a full disk), says so once and falls silent.

    ``logging``'s own handler prints a traceback for every line that fails.
    """

    failed = False

    def handleError(self, record):
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            reason = getattr(error, "strerror", None) or error or "unknown error"
            print(f"warning: cannot write the log file {self.baseFilename} ({reason}); its lines go to the "
                  "console only from here on", file=sys.stderr, flush=True)

    def emit(self, record):
        if not self.failed:
            super().emit(record)

    def close(self):
        try:
            super().close()
        except OSError:  # the last buffered bytes did not fit either
            self.handleError(None)


def open_log_file(path):
    """A ``logging.FileHandler`` appending to ``path`` (its folder created), or a one-line error saying why not.

    Args:
        path: the log file.

    Returns:
        logging.FileHandler: the handler.

    Raises:
        ValueError: ``path`` names a folder.
        OSError: the file cannot be created or opened (a read-only place, a file where a folder should be).
    """
    if os.path.isdir(path):
        raise ValueError(f"log file {path} is a folder: name a file (e.g. {os.path.join(path, 'train.log')})")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return _LogFile(path, encoding="utf-8")
    except OSError as error:
        # makedirs says "File exists" when a file stands where a folder of the path should be.
        reason = "a file stands where a folder of its path should be" \
            if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror or error
        failure = OSError(f"cannot open the log file {path}: {reason}")
        failure.errno = error.errno  # set after construction: the message stays one plain line
        raise failure from None


@contextlib.contextmanager
def setup(log_file=None):
    """Attaches the command line's handlers to the ``fastabsld`` logger for the ``with`` block.

    Lines below ERROR go to stdout, errors to stderr, all of them (with a time stamp) to ``log_file``
    when given (appended; only on rank 0 under torchrun, where the other ranks say nothing).

    Args:
        log_file: path of a file that also receives every line, or None.

    Yields:
        logging.Logger: the configured logger.

    Raises:
        ValueError: ``log_file`` names a folder.
        OSError: ``log_file`` cannot be opened for appending (the message names it and why).
    """
    log = logger()
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    handlers = [out, err]
    if log_file and os.environ.get("RANK", "0") == "0":
        to_file = open_log_file(log_file)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
        handlers.append(to_file)
    level = log.level
    log.setLevel(logging.INFO)
    for handler in handlers:
        log.addHandler(handler)
    try:
        yield log
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close() if isinstance(handler, logging.FileHandler) else handler.flush()
        log.setLevel(level)


def show_progress(requested):
    """Whether to draw progress bars: when asked for and standard error is a terminal.

    Args:
        requested: the run's ``progress`` setting (``--no-progress`` turns it off).

    Returns:
        bool: draw bars.
    """
    if not requested:
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def around_bars(active):
    """Routes the logger's console lines through tqdm while bars are drawn, so that lines and bars do not mix.

    Args:
        active: whether bars are drawn.

    Yields:
        None.
    """
    if not active:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logger()]):
        yield


def _number(value, digits=4):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _fixed(value):
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def epoch_line(entry, *, epochs, method, best=False):
    """The one plain line that tells what an epoch did.

    Args:
        entry: the epoch's history entry (``epoch``, ``train_loss``, ``lr``, optionally ``beta``,
            ``val``, ``tau_adv``/``tau_nat``, ``class_weight`` (Fair-ARD re-weighting), ``introspective``
            (IAD past its warm-up), ``seconds``).
        epochs: the run's number of epochs.
        method: the run's method (the line's prefix, which tells runs of a demo apart).
        best: the validation made this epoch's weights the kept ones.

    Returns:
        str: e.g. ``absld epoch 3/30  loss 0.1234  lr 0.1  beta 0.1  val clean avg 0.912 worst 0.833
        nsd 0.052  val pgd20 avg 0.612 worst 0.401 nsd 0.181 (best)  tau_adv 0.82..1.21  tau_nat 0.95..1.02
        12.3 s``; a re-weighted run adds ``class_weight 0.833..2.5``, an IAD run ``introspective`` after its
        warm-up.
    """
    loss = entry.get("train_loss")
    parts = [f"{method} epoch {entry['epoch']}/{epochs}",
             f"loss {'n/a' if loss is None else f'{loss:.4f}'}",
             f"lr {_number(entry.get('lr'))}"]
    # Temperatures that cannot move (RSLAD: beta = 0, all at 1) are left out of the line.
    moving = bool(entry.get("beta"))
    if moving:
        parts.append(f"beta {_number(entry['beta'])}")
    for attack, m in (entry.get("val") or {}).items():
        parts.append(f"val {attack} avg {_fixed(m.get('average'))} worst {_fixed(m.get('worst'))} "
                     f"nsd {_fixed(m.get('nsd'))}")
    if best:
        parts[-1] += " (best)"
    for key in ("tau_adv", "tau_nat"):
        values = [v for v in entry.get(key) or () if v is not None]
        if values and (moving or min(values) != max(values)):
            parts.append(f"{key} {min(values):.3g}..{max(values):.3g}")
    weights = [v for v in entry.get("class_weight") or () if v is not None]
    if weights:
        parts.append(f"class_weight {min(weights):.3g}..{max(weights):.3g}")
    if entry.get("introspective"):
        parts.append("introspective")
    if entry.get("nonfinite_batches"):
        parts.append(f"non-finite loss in {entry['nonfinite_batches']} batches")
    if "seconds" in entry:
        parts.append(f"{entry['seconds']:.1f} s")
    return "  ".join(parts)


def epoch_scalars(entry):
    """The numbers of an epoch's line as TensorBoard scalars.

    Args:
        entry: the epoch's history entry.

    Returns:
        dict: tag -> float (``train/loss``, ``train/lr``, ``train/beta``, ``val/<attack>/<average|worst|nsd>``,
        ``temperature/<adv|nat>_<min|max>``, ``reweight/class_weight_<min|max>``, ``time/epoch_seconds``);
        missing figures are left out.
    """
    scalars = {"train/loss": entry.get("train_loss"), "train/lr": entry.get("lr"), "train/beta": entry.get("beta"),
               "time/epoch_seconds": entry.get("seconds")}
    for attack, m in (entry.get("val") or {}).items():
        for key in ("average", "worst", "nsd"):
            scalars[f"val/{attack}/{key}"] = m.get(key)
    for key, short in (("tau_adv", "adv"), ("tau_nat", "nat")):
        values = [v for v in entry.get(key) or () if v is not None]
        if values:
            scalars[f"temperature/{short}_min"] = min(values)
            scalars[f"temperature/{short}_max"] = max(values)
    weights = [v for v in entry.get("class_weight") or () if v is not None]
    if weights:
        scalars["reweight/class_weight_min"] = min(weights)
        scalars["reweight/class_weight_max"] = max(weights)
    return {tag: float(value) for tag, value in scalars.items() if value is not None}


def final_scalars(test):
    """The final test evaluation as TensorBoard scalars (``test/<attack>/<average|worst|nsd>``).

    Args:
        test: ``{attack: {...}}`` from ``evaluate``.

    Returns:
        dict: tag -> float.
    """
    return {f"test/{attack}/{key}": float(m[key]) for attack, m in test.items() for key in ("average", "worst", "nsd")
            if m.get(key) is not None}


class Scalars:
    """Epoch scalars written to a SummaryWriter-like object (``add_scalar(tag, value, step)``, ``flush``, ``close``).

    Args:
        writer: the writer.
    """

    def __init__(self, writer):
        self.writer = writer

    def add(self, scalars, step):
        """Writes ``scalars`` (tag -> float) at ``step`` and flushes them to disk.

        Args:
            scalars: tag -> value.
            step: the epoch.
        """
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self):
        """Closes the writer."""
        self.writer.close()


def tensorboard_writer(run_dir, *, first_epoch):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``run_dir``, or None when tensorboard is absent.

    Args:
        run_dir: the run folder (the event files go there, one writer per process that runs it).
        first_epoch: the first epoch this process will log (1-based); events at and after it left by a
            killed run are discarded, so a resumed run's curves have no duplicates.

    Returns:
        SummaryWriter or None.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional
        return None
    return SummaryWriter(log_dir=run_dir, purge_step=first_epoch if first_epoch > 1 else None)
