"""What `bp-ray pipeline` shows a person: one line per stage (a live bar while it runs, on a terminal), then the
summary, last and whole. Everything the libraries print goes to files under <run>/logs/ instead:

    logs/bp-ray.log   the driver's Python logging (bp-ray, Ray Data, Ray Train, transformers, warnings)
    logs/output.log   everything written to the driver's stdout / stderr: Ray's own lines, the output of every
                      Ray worker (Ray forwards it to the driver, prefixed with the actor and pid), DeepSpeed,
                      loading bars, C++ logs

The capture is at the file-descriptor level, so it also takes what native code and child processes write, with no
list of loggers to keep up to date. `-v` leaves the console as it was (libraries print there) and keeps the files.

Progress crosses process boundaries as small JSON files in `logs/progress/`, one per reporter: the stage code on
the driver and rank 0 of each training run write theirs (`report_progress`), the console polls them and adds them
up (the two reward models train at once). The run folder is already shared between the driver and the workers
(rank 0 writes the metrics that the evaluation reads), so no actor is needed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

PROGRESS_ENV = "BP_RAY_PROGRESS_FILE"
LOGS_DIR = "logs"
PYTHON_LOG = "bp-ray.log"
OUTPUT_LOG = "output.log"
PROGRESS_DIR = "progress"
NAME_WIDTH = 9
BAR_WIDTH = 24
REDRAW_S = 0.5

logger = logging.getLogger(__name__)


# --- reporting side (driver stage code and training workers) ------------------------------------------------------

def report_progress(done: int, total: int, unit: str = "", note: str = "", key: str = "stage") -> None:
    """Tell the pipeline's console how far the running stage is (`key` names the reporter, when a stage has
    several); a no-op outside `bp-ray pipeline`."""
    folder = os.environ.get(PROGRESS_ENV)
    if not folder:
        return
    path = Path(folder) / f"{key.replace('/', '-').replace(':', '-')}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"done": int(done), "total": int(total), "unit": unit, "note": note,
                                   "time": time.time()}))
        os.replace(tmp, path)  # atomic: the console never reads half a file
    except OSError:  # progress is a courtesy: a full disk or a vanished run folder must not stop training
        pass


class StepProgress:
    """The part of tqdm's interface the training loops use, reporting to the console's progress file."""

    def __init__(self, name: str, total: int, initial: int = 0, unit: str = "steps"):
        self.name, self.total, self.n, self.unit, self.note = name, total, initial, unit, ""
        report_progress(self.n, self.total, self.unit, key=self.name)

    def set_description(self, desc: str) -> None:
        # The console's line already starts with the stage name; a sub-run's name ("rm:pickscore") stays.
        if desc.startswith(self.name + " "):
            head = self.name.partition(":")[2]
            desc = (head + " " if head else "") + desc[len(self.name) + 1:]
        self.note = desc

    def update(self, n: int = 1) -> None:
        self.n += n
        report_progress(self.n, self.total, self.unit, self.note, key=self.name)

    def close(self) -> None:
        pass


def progress_enabled() -> bool:
    """True inside `bp-ray pipeline` without -v (workers inherit the variable through Ray's runtime env)."""
    return bool(os.environ.get(PROGRESS_ENV))


# --- console side (the driver of `bp-ray pipeline`) ---------------------------------------------------------------

def format_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = min(width, int(width * done / total)) if total > 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def stage_line(name: str, text: str) -> str:
    return f"{name:<{NAME_WIDTH}} {text}"


class Console:
    """Stage lines and the summary on `stream`; with `live`, a bar of the running stage redrawn in place."""

    def __init__(self, stream: TextIO, live: bool = False, progress_dir: Path | None = None,
                 columns: int = 100):
        self.stream, self.live, self.progress_dir, self.columns = stream, live, progress_dir, columns
        self._stage: str | None = None
        self._started = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if live:
            self._thread = threading.Thread(target=self._redraw_loop, name="bp-ray-console", daemon=True)
            self._thread.start()

    def start(self, stage: str) -> None:
        with self._lock:
            self._stage, self._started = stage, time.time()
            for old in self.progress_dir.glob("*.json") if self.progress_dir else ():
                old.unlink(missing_ok=True)  # the previous stage's last reports
            self._draw()

    def finish(self, stage: str, text: str) -> None:
        """The stage's final line, in place of its bar."""
        with self._lock:
            self._stage = None
            self._write_line(stage_line(stage, text))

    def fail(self, error: BaseException) -> None:
        """The running stage's last line when an error stops it (its traceback follows on stderr)."""
        with self._lock:
            stage, self._stage = self._stage, None
            if stage is None:
                return
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else \
                f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            self._write_line(stage_line(stage, f"{reason} after {time.time() - self._started:.1f} s"))

    def print(self, text: str = "") -> None:
        with self._lock:
            self._write_line(text)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.live and self._stage is not None:
                self.stream.write("\r\x1b[K")  # a stage cut off by an error leaves no half-drawn bar behind
            self._stage = None
            self.stream.flush()

    def progress_text(self) -> str:
        """The running stage's line: bar, count, note and seconds so far."""
        elapsed = f"{time.time() - self._started:.0f} s"
        report = self._read_progress()
        if not report or not report.get("total"):
            return stage_line(self._stage or "", f"running  {elapsed}")
        note = f"  {report['note']}" if report.get("note") else ""
        count = f"{report['done']}/{report['total']}{' ' + report['unit'] if report.get('unit') else ''}"
        return stage_line(self._stage or "", f"{format_bar(report['done'], report['total'])} {count}{note}  "
                                             f"{elapsed}")

    def _read_progress(self) -> dict | None:
        """This stage's reports added up: steps of runs side by side, their notes joined."""
        reports = []
        for path in sorted(self.progress_dir.glob("*.json")) if self.progress_dir else ():
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):  # removed between the listing and the read
                continue
            if report.get("time", 0) >= self._started - 1:
                reports.append(report)
        if not reports:
            return None
        return {"done": sum(r["done"] for r in reports), "total": sum(r["total"] for r in reports),
                "unit": reports[0].get("unit", ""), "note": ", ".join(r["note"] for r in reports if r.get("note"))}

    def _write_line(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.live else "") + text + "\n")
        self.stream.flush()
        if self.live and self._stage is not None:
            self._draw()

    def _draw(self) -> None:
        if not (self.live and self._stage):
            return
        self.stream.write("\r" + self.progress_text()[:self.columns - 1] + "\x1b[K")
        self.stream.flush()

    def _redraw_loop(self) -> None:
        while not self._stop.wait(REDRAW_S):
            with self._lock:
                self._draw()


class WarningCounter(logging.Handler):
    """Counts the driver's log records at WARNING and above (the summary says how many the log file holds)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


@contextlib.contextmanager
def _captured_output(log_path: Path) -> Iterator[int]:
    """Point file descriptors 1 and 2 at log_path; yields a duplicate of the original stdout for the console."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield saved_out
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)


def _quiet_libraries() -> None:
    """Progress bars nobody sees cost CPU and fill output.log with redraws: Ray Data's (driver side, read when
    ray.data is imported, or from the DataContext once it is)."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def pipeline_console(run_dir: Path, verbose: bool) -> Iterator[tuple[Console, WarningCounter]]:
    """The console of one `bp-ray pipeline` run and the counter of the driver's warnings.

    Without `verbose`, stdout and stderr go to <run>/logs/output.log until the block ends, the driver's logging
    to logs/bp-ray.log only, and training workers report their steps to the console; a Ray instance this block
    started is shut down before the console gets its streams back, so no late worker line lands after the summary.
    """
    folder = Path(run_dir) / LOGS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file_handler = logging.FileHandler(folder / PYTHON_LOG)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"))
    counter = WarningCounter()
    previous = {"handlers": list(root.handlers), "level": root.level,
                "env": os.environ.get(PROGRESS_ENV)}
    logging.captureWarnings(True)
    if not verbose:
        for handler in previous["handlers"]:
            root.removeHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))
    root.addHandler(file_handler)
    root.addHandler(counter)
    ray_was_up = _ray_initialized()
    try:
        if verbose:
            yield Console(sys.stdout), counter
            return
        progress = (folder / PROGRESS_DIR).resolve()
        progress.mkdir(exist_ok=True)
        os.environ[PROGRESS_ENV] = str(progress)
        _quiet_libraries()
        with _captured_output(folder / OUTPUT_LOG) as console_fd:
            stream = os.fdopen(os.dup(console_fd), "w", buffering=1, encoding="utf-8", errors="replace")
            console = Console(stream, live=os.isatty(console_fd), progress_dir=progress,
                              columns=_columns(console_fd))
            try:
                yield console, counter
            finally:
                console.close()
                if not ray_was_up and _ray_initialized():
                    import ray

                    ray.shutdown()
                stream.close()
                shutil.rmtree(progress, ignore_errors=True)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(file_handler)
        root.removeHandler(counter)
        file_handler.close()
        for handler in previous["handlers"]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(previous["level"])
        if previous["env"] is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous["env"]


def _ray_initialized() -> bool:
    if "ray" not in sys.modules:  # importing Ray only to ask would cost a second of start-up
        return False
    import ray

    return ray.is_initialized()


def _columns(fd: int) -> int:
    try:
        columns = os.get_terminal_size(fd).columns
    except OSError:
        return 100
    return columns if columns >= 40 else 100  # a pseudo-terminal without a size reports 0
