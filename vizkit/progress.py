"""How a run reports its progress: per step (reading the images, each technique, each
metric), how much is done of how much, and the messages the steps send.

The runner calls a :class:`Progress`: ``start(name, total, unit)``, ``advance(count)``
as the work gets done, ``message(text)`` for what a step says about itself (and, outside
steps, what the run does: loading the model, writing the report), ``finish(status,
detail)``, and ``error(text)`` for a failure, printed whatever the display. The CLI
picks one with :func:`for_stderr`: :class:`Bar` (a Click progress bar per step) when
stderr is a terminal, :class:`Lines` (one line per step, when it ends) when it is not,
and the silent :class:`Progress` with ``-q``. A ``progress(message)`` callable, as
``vizkit.run`` has always taken, is wrapped in ``Lines(callback, messages=True)``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

import click

from vizkit.safe_read import printable

#: What ``finish`` may say about a step; the first four are a technique's report status.
STATUSES = ("ok", "partial", "error", "skipped", "interrupted")
#: Units whose rate a display shows (a rate of techniques per second says nothing).
RATED_UNITS = ("images",)


class Progress:
    """Where a run reports its progress; this one shows nothing, and prints failures on
    stderr. Subclass it and override what you need (all but ``error`` do nothing here).

    A step is ``start``, any number of ``advance`` and ``message``, then ``finish``;
    steps do not nest. ``message`` is also called outside steps.
    """

    def message(self, text: str) -> None:
        """A free-form message: within a step, what the step says about itself (a
        technique's ``context.progress``); outside one, what the run does."""

    def start(self, name: str, total: int | None, unit: str = "images") -> None:
        """A step begins: ``total`` of ``unit`` to do, or None where the step has no
        count (a technique that is not per image, such as ``filters``)."""

    def advance(self, count: int = 1) -> None:
        """``count`` more of the step's total are done (failed ones included)."""

    def finish(self, status: str = "ok", detail: str | None = None) -> None:
        """The step ended: ``status`` is one of :data:`STATUSES`; ``detail`` says what
        went wrong (``"1 image(s) failed"``), or None."""

    def error(self, text: str) -> None:
        """A failure (a technique's, an image's): printed on stderr as ``vizkit: text``,
        with or without a display; a display keeps its bar intact around it."""
        print(f"vizkit: {text}", file=sys.stderr)


@dataclass
class Step:
    """The step a display is showing, timed from its start."""

    name: str
    total: int | None
    unit: str
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def amount(self) -> str:
        """``3 images``, or ``2 of 3 images`` for a step that stopped short."""
        if self.total is None or self.done == self.total:
            return counted(self.done, self.unit)
        return f"{self.done} of {counted(self.total, self.unit)}"

    def rate(self) -> str:
        """``2.5 images/s``, or "" where there is none to give."""
        seconds = self.seconds
        if self.unit not in RATED_UNITS or not self.done or seconds <= 0:
            return ""
        return f"{self.done / seconds:.1f} {self.unit}/s"

    def outcome(self, status: str, detail: str | None, counts: bool = True) -> str:
        """How the step ended, in words: ``3 images in 1.2 s (2.5 images/s)``,
        ``3 images in 1.2 s (2.5 images/s); 1 image(s) failed``, ``failed after 1 of 3
        images in 0.4 s``, ``skipped: no image could be read``. Without ``counts`` (a bar
        shows them) it starts with the status: ``done in 1.2 s (2.5 images/s)``,
        ``1 image(s) failed; done in …``. A failure's reason is left out: the run prints
        it on its own line."""
        took = duration(self.seconds)
        amount = f"{self.amount()} " if counts and self.total is not None else ""
        if status == "skipped":
            return f"skipped: {detail}" if detail else "skipped"
        if status in ("error", "interrupted"):
            return f"{'failed' if status == 'error' else 'interrupted'} after {amount}{'in ' if amount else ''}{took}"
        rate = self.rate()
        done = f"in {took}" + (f" ({rate})" if rate else "")
        if not amount:
            done = f"done {done}"
            return f"{detail}; {done}" if status == "partial" and detail else done
        done = amount + done
        return f"{done}; {detail}" if status == "partial" and detail else done


def duration(seconds: float) -> str:
    """``0.42 s``, ``12.3 s``, ``4 min 05 s``."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def counted(count: int, unit: str) -> str:
    """``1 image``, ``3 images``."""
    return f"{count} {unit[:-1] if count == 1 and unit.endswith('s') else unit}"


class Tracking(Progress):
    """A Progress that keeps the current :class:`Step` (``self.step``, None between steps)."""

    step: Step | None = None

    def start(self, name: str, total: int | None, unit: str = "images") -> None:
        self.step = Step(name, total, unit)

    def advance(self, count: int = 1) -> None:
        if self.step is not None:
            self.step.done += count

    def finish(self, status: str = "ok", detail: str | None = None) -> None:
        self.step = None


class Lines(Tracking):
    """One line per step as it ends, through ``write``: ``gradcam: 3 images in 1.2 s
    (2.5 images/s)``. With ``messages``, also a line as each step starts and every
    message (``gradcam: …`` within a step): how a ``progress(message)`` callable of
    ``vizkit.run`` is called."""

    def __init__(self, write: Callable[[str], None], messages: bool = False):
        self.write = write
        self.messages = messages

    def message(self, text: str) -> None:
        if self.messages:
            self.write(f"{self.step.name}: {text}" if self.step else text)

    def start(self, name: str, total: int | None, unit: str = "images") -> None:
        super().start(name, total, unit)
        if self.messages:
            self.write(f"{name}: running" + (f" ({counted(total, unit)})" if total is not None else ""))

    def finish(self, status: str = "ok", detail: str | None = None) -> None:
        if self.step is not None:
            self.write(f"{self.step.name}: {self.step.outcome(status, detail)}")
        super().finish(status, detail)


class Bar(Tracking):
    """A Click progress bar per step on ``stream`` (a terminal): the step's name, images
    done of the total, the ETA, the rate, and the step's latest message; the bar stays
    on screen when the step ends, with how it ended. Messages outside steps and
    failures are lines of their own, ``vizkit: …``."""

    #: Characters of the bar itself, and of the name before it (names are padded to it).
    WIDTH = 20
    LABEL = 14

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.bar = None
        self.text = ""

    def message(self, text: str) -> None:
        if self.bar is None:
            click.echo(f"vizkit: {printable(text)}", file=self.stream)
            return
        self.text = printable(text)
        self.bar.render_progress()

    def start(self, name: str, total: int | None, unit: str = "images") -> None:
        if self.step is not None:  # a step left open: end its line first
            self.finish("interrupted")
        super().start(name, total, unit)
        self.text = ""
        self.bar = click.progressbar(
            length=total if total is not None else 1,
            label=printable(name).ljust(self.LABEL),
            file=self.stream,
            show_pos=total is not None,
            show_percent=False,
            show_eta=total is not None,
            item_show_func=lambda item: self.info(),
            width=self.WIDTH,
            # no count, nothing to fill: the name, the seconds so far and the message
            bar_template="%(label)s  [%(bar)s]  %(info)s" if total is not None else "%(label)s  %(info)s",
        )
        self.bar.__enter__()

    def advance(self, count: int = 1) -> None:
        super().advance(count)
        if self.bar is not None:
            self.bar.update(count)

    def finish(self, status: str = "ok", detail: str | None = None) -> None:
        if self.bar is None or self.step is None:
            return
        bar, step = self.bar, self.step
        self.text = step.outcome(status, detail, counts=False)
        self.bar = None  # info() shows the outcome alone from now on
        if status == "ok":
            bar.finish()  # full, whatever the count: the work is done
        bar.show_eta = False
        bar.render_progress()
        bar.render_finish()
        super().finish(status, detail)

    def error(self, text: str) -> None:
        if self.bar is None:
            click.echo(f"vizkit: {text}", file=self.stream)
            return
        self.stream.write("\r\033[K")  # the bar's line, cleared; the bar is drawn again below
        click.echo(f"vizkit: {text}", file=self.stream)
        self.stream.write("\r" + self.bar.format_progress_line())
        self.stream.flush()

    def info(self) -> str:
        """What follows the bar: the rate (or, without a count, the seconds so far) and
        the latest message, running; how the step ended, after. Fitted to the terminal's
        width: a message loses its middle (its start names the layer, its end, ``step 6
        of 40``, is what changes), an outcome its end."""
        step = self.step
        if step is None:
            return ""
        room = self.columns() - 1 - self.used(step)
        if self.bar is None:  # ended: self.text is how
            return self.text if len(self.text) <= room else self.text[: max(room - 3, 0)] + "..."
        lead = step.rate() if step.total is not None else f"{step.seconds:.0f} s"
        if len(lead) > room:
            return ""
        return "  ".join(part for part in (lead, shorten(self.text, room - len(lead) - 2)) if part)

    def columns(self) -> int:
        """The terminal's width: ``$COLUMNS``, else the stream's own terminal (stdout may
        be a file), else 80."""
        if not os.environ.get("COLUMNS"):
            try:
                columns = os.get_terminal_size(self.stream.fileno()).columns
            except (AttributeError, OSError, ValueError):
                columns = 0
            if columns > 0:
                return columns
        return shutil.get_terminal_size().columns

    def used(self, step: Step) -> int:
        """Columns the bar's line takes before the info text: ``name  [####]  3/5  00:00:02  ``."""
        used = max(len(step.name), self.LABEL) + 2  # the name
        if step.total is not None:
            used += self.WIDTH + 4 + len(f"{step.done}/{step.total}") + 2
            bar = self.bar
            if bar is not None and bar.show_eta and bar.eta_known and not bar.finished:
                used += len(bar.format_eta()) + 2
        return used


def shorten(text: str, room: int) -> str:
    """``text`` in ``room`` characters, its middle left out: a progress message's start
    names what it works on, its end (``, step 6 of 40``, kept whole where it fits) is what
    changes. "" where there is no room to speak of."""
    if len(text) <= room:
        return text
    if room <= 12:
        return ""
    tail = (room - 3) * 2 // 3
    last = text.rfind(", ")
    if last > 0 and tail < len(text) - last <= room - 6:
        tail = len(text) - last
    return text[: room - 3 - tail] + "..." + text[len(text) - tail:]


def for_stderr(quiet: bool) -> Progress:
    """What ``vizkit run`` and ``vizkit demo`` show on stderr: nothing with ``-q`` (but
    failures); a progress bar per step on a terminal; else one line per step."""
    if quiet:
        return Progress()
    stream = stderr()
    if stream.isatty():
        return Bar(stream)
    return Lines(lambda line: click.echo(f"vizkit: {printable(line)}", file=stream))


def stderr() -> TextIO:
    """The stream progress goes to: ``sys.stderr``, as the run's own failure lines, so
    that the two keep their order (the tests give a terminal here)."""
    return sys.stderr


def as_progress(progress: Progress | Callable[[str], None]) -> Progress:
    """``progress`` itself, or a ``progress(message)`` callable wrapped in :class:`Lines`."""
    return progress if isinstance(progress, Progress) else Lines(progress, messages=True)


class StepHandle:
    """What :func:`step` gives the runner: ``advance`` and an explicit ``finish``."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.finished = False

    def advance(self, count: int = 1) -> None:
        self.progress.advance(count)

    def finish(self, status: str = "ok", detail: str | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.progress.finish(status, detail)


@contextmanager
def step(progress: Progress, name: str, total: int | None, unit: str = "images") -> Iterator[StepHandle]:
    """A step from ``start`` to ``finish``, however the block ends: ``ok`` unless it
    called ``finish`` itself, ``interrupted`` on Ctrl-C, ``error`` on an exception."""
    handle = StepHandle(progress)
    progress.start(name, total, unit)
    try:
        yield handle
    except KeyboardInterrupt:
        handle.finish("interrupted")
        raise
    except BaseException as error:
        handle.finish("error", f"{type(error).__name__}: {error}")
        raise
    handle.finish()
