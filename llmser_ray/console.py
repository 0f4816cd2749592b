"""What a command prints: known-harmless library noise dropped, progress with rate and ETA.

A green run used to print tracebacks and error-level lines that are no error of the user's and
need no action: Python's resource tracker complaining about segments it never saw (a vLLM engine
shutting down after its actor's tracker was gone), Ray's C++ "constructor arguments in the
object store and max_restarts > 0" note for every restartable actor, Ray Train's placement-group
cleaner retrying a state API that is off, a ``SystemExit`` from Tune's SIGTERM to a finished
trial. A user learns to skip error lines, and then skips a real one. Where a source can be
switched off it is (``ray_utils.init_ray``: the preemption watcher of a one-machine Ray, the
state API address of its own cluster); what is left is dropped here by exact signature, never by
level, so a new warning still shows. ``--verbose`` (``LLMSER_VERBOSE=1``) turns all of it off.

Two places see that output: the driver, which prints every worker's streamed stdout/stderr
(``install_driver_filters`` wraps Ray's printer), and each worker's own Python logging and
warnings (``worker_setup``, Ray's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

VERBOSE_ENV = "LLMSER_VERBOSE"
WORKER_SETUP_HOOK = "llmser_ray.console.worker_setup"

# One-line messages that are never actionable for a user of this project.
_NOISE_LINES = re.compile("|".join([
    # Ray core (C++), once per restartable actor whose constructor arguments are object refs.
    r"has constructor arguments in the object store and max_restarts > 0",
    # Ray Train's placement-group cleaner, every few seconds while the state API is off.
    r"Failed to query Ray Train Controller actor state",
    # multiprocessing's tracker relaunched in a vLLM engine process at shutdown (see _harmless).
    r"resource_tracker: process died unexpectedly, relaunching",
    r"warnings\.warn\('resource_tracker: process died unexpectedly",
    # vLLM on CPU: optional accelerations it does not have, on every engine start.
    r"Triton is installed, but doesn't include CPU backend",
    r"Warning: NUMA binding: Using MEMBIND policy",
    # Ray Data, once, where quiet_ray_data / iter_plain_batches chose its progress display.
    r"Progress bars (for operators )?disabled\. To enable, set",
]))

# Python warnings raised inside libraries about their own use of other libraries.
_NOISE_WARNINGS: list[tuple[str, type[Warning]]] = [
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),
    (r"Use 'expr' instead of 'fn' when possible", UserWarning),
]
# The source line Python prints under a warning it shows (two lines per warning otherwise).
_WARNING_SOURCE = re.compile(r"^\s+(if hasattr\(value, \"__dict__\"\)|wrapper = lookup\(vars\(value\))")
_WARNING_HEAD = re.compile(r"(FutureWarning: `torch\.distributed\.reduce_op` is deprecated|"
                           r"UserWarning: Use 'expr' instead of 'fn')")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def interactive() -> bool:
    """Whether progress can redraw in place (a terminal), as Ray Data decides it (stdout)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def set_verbose(verbose: bool) -> None:
    """Record ``--verbose`` where the processes a local Ray starts inherit it too."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def _harmless(block: list[str]) -> bool:
    """Whether a whole traceback block is one of the known-harmless ones."""
    text = "\n".join(block)
    last = block[-1].strip()
    # A vLLM engine process unlinks its shared memory and semaphores on shutdown after its
    # actor's tracker was already killed; the relaunched tracker never saw them.
    if "resource_tracker.py" in text and "cache[rtype].remove(name)" in text and last.startswith("KeyError:"):
        return True
    # Tune stops a finished trial's actor with SIGTERM; Ray turns it into SystemExit, which
    # Python reports as "ignored" when it lands inside a garbage-collection callback.
    return (block[0].startswith("Exception ignored in") and "sigterm_handler" in text
            and last.startswith("SystemExit"))


def drop_noise(lines: list[str]) -> list[str]:
    """``lines`` without the known-harmless lines and traceback blocks (``_NOISE_LINES``, ``_harmless``).

    A traceback is the ``Traceback (most recent call last):`` line (after an optional
    ``Exception ignored in`` line), its indented or blank frame lines and the first line after
    them (the exception). An incomplete block at the end is kept as it is.
    """
    out: list[str] = []
    i = 0
    n = len(lines)
    while i < n:
        line = lines[i]
        if _NOISE_LINES.search(line):
            i += 1
            continue
        if _WARNING_HEAD.search(line):
            i += 1
            if i < n and _WARNING_SOURCE.match(lines[i]):
                i += 1
            continue
        if line.startswith("Exception ignored in") and i + 1 < n and lines[i + 1].startswith("Traceback ("):
            j = i + 2
        elif line.startswith("Traceback ("):
            j = i + 1
        else:
            out.append(line)
            i += 1
            continue
        while j < n and (lines[j][:1] in (" ", "\t") or not lines[j].strip()):
            j += 1
        if j >= n:
            out.extend(lines[i:])
            break
        block = lines[i:j + 1]
        if not _harmless(block):
            out.extend(block)
        i = j + 1
    return out


class _NoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not _NOISE_LINES.search(record.getMessage())
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
            return True


_FILTER = _NoiseFilter()
# Loggers that emit the lines in _NOISE_LINES from Python.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                  "ray.data._internal.progress")


def _quiet_python() -> None:
    for pattern, category in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def setup(verbose: bool = False) -> None:
    """The driver's side, called once per command before any stage (cheap: imports no Ray).

    ``verbose`` adds to ``LLMSER_VERBOSE=1`` from the environment, never clears it.
    """
    if verbose:
        set_verbose(True)
    if not is_verbose():
        _quiet_python()


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: the same Python-side filters in every worker."""
    if not is_verbose():
        _quiet_python()


def ray_init_options() -> dict[str, Any]:
    """Extra ``ray.init`` arguments: the worker hook, unless ``--verbose``."""
    if is_verbose():
        return {}
    return {"runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK}}


_PRINTER = "ray_print_logs"


def install_driver_filters() -> None:
    """Drop known noise from the worker output Ray streams to this driver (after ``ray.init``).

    Ray prints that stream through one handler of its stdstream dispatcher (a private API of
    the pinned Ray 2.60, hence the guard: if it is not there, output stays unfiltered).
    """
    if is_verbose():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray
        return
    lock = getattr(dispatcher, "_lock", None)
    handlers = getattr(dispatcher, "handlers", None)
    if lock is None or not isinstance(handlers, list):  # pragma: no cover - another Ray
        return
    with lock:
        dispatcher.handlers = [(name, _filtered(h) if name == _PRINTER else h) for name, h in handlers]


def _filtered(handler: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    if getattr(handler, "_llmser_filtered", False):
        return handler

    def emit(data: dict[str, Any]) -> None:
        lines = data.get("lines")
        if lines:
            kept = drop_noise(list(lines))
            if not kept:
                return
            data = {**data, "lines": kept}
        handler(data)

    emit._llmser_filtered = True  # type: ignore[attr-defined]
    return emit


# ----------------------------------------------------------------------------- progress

T = TypeVar("T")


def _duration(seconds: float) -> str:
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts, rate and ETA of a long loop, as plain lines (readable in a nohup log).

    One line at most every ``every`` seconds, and a summary line at the end. Lines go to
    stdout, as the stages' other messages do.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "items", every: float = 15.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream
        self.clock = clock
        self.done = 0
        self.t0 = clock()
        self._last = self.t0

    def _write(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text = f"[{self.label}] {count} {self.unit}, {rate:.2f}/s"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
            if rate > 0 and self.done < self.total:
                text += f", ETA {_duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._last >= self.every:
            self._last = now
            self._write(self.line())

    def close(self) -> None:
        elapsed = self.clock() - self.t0
        rate = f", {self.done / elapsed:.2f}/s" if elapsed > 0 else ""
        self._write(f"[{self.label}] done: {self.done} {self.unit} in {_duration(elapsed)}{rate}")


def progress(items: Iterable[T], label: str, total: int | None = None, unit: str = "items",
             count: Callable[[T], int] | None = None, every: float = 15.0) -> Iterator[T]:
    """Yield ``items`` and report progress; ``count(item)`` says how many units an item holds
    (e.g. ``lambda b: b.num_rows`` for batches), 1 each without it."""
    bar = Progress(label, total, unit, every)
    for item in items:
        yield item
        bar.update(count(item) if count else 1)
    bar.close()
