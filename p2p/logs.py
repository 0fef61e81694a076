"""The node's log formats, and progress reports for long jobs.

A log record carries its facts twice: in its message, for a person reading the
line, and as structured fields passed with `extra=` (`height`, `hash`, `peer`,
`reason`, `seconds`, ...), for a program reading it. Both formats write one
line per record on stderr:

- `text` (the default): logfmt, `time=... level=... logger=... msg="..."`, then
  each field as `key=value`;
- `json`: one JSON object per line, `time` (Unix seconds), `level`, `logger`,
  `message`, then each field as a key (bytes as lowercase hex).

`Progress` reports a long job's rate and ETA (`potchain replay`, a node
catching up many heights by sync, a miner's training rounds): a tqdm bar when
stderr is a terminal (and the format is text), otherwise an INFO log line at the start, at most every
`interval` seconds, and at the end, with the fields `job`, `done`, `total`,
`unit`, `rate` (per second) and `eta_seconds`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

FORMATS = ("text", "json")
"""The log formats `--log-format` takes."""

_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
"""The attributes every LogRecord has: the rest came with `extra=`."""


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was given with `extra=`, as JSON-ready values."""
    return {
        name: _plain(value)
        for name, value in vars(record).items()
        if name not in _STANDARD_ATTRIBUTES and not name.startswith("_")
    }


def _plain(value: Any) -> Any:
    """A JSON-ready form of a field's value: bytes as hex, non-finite floats as null, others as text."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return str(value)


def _logfmt_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class TextFormatter(logging.Formatter):
    """One line per record: time, level, logger and message, then its fields, as key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace('"', "'")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f'time={stamp} level={record.levelname.lower()} logger={record.name} msg="{message}"'
        for name, value in record_fields(record).items():
            line += f" {name}={_logfmt_value(value)}"
        if record.exc_info:
            line += ' error="' + self.formatException(record.exc_info).replace("\n", " | ").replace('"', "'") + '"'
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then each field as a key."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record_fields(record).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """A handler that writes to the process's stderr as it is when a record comes (not as it was
    when the handler was made), above a tqdm bar on a terminal instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        if not _is_terminal(self.stream):
            super().emit(record)
            return
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def configure_logging(level: str, style: str) -> None:
    """Log records at `level` and above on stderr in the format `style` ("text" or "json");
    libp2p's own records only from WARNING."""
    if style not in FORMATS:
        raise ValueError(f"log format: got {style!r}, want one of {', '.join(FORMATS)}")
    handler = ConsoleHandler()
    handler.setFormatter(JsonFormatter() if style == "json" else TextFormatter())
    handler.addFilter(lambda record: record.levelno >= logging.WARNING or not record.name.startswith("libp2p"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _logs_json() -> bool:
    """Whether the process logs JSON lines (then progress is JSON lines too, even on a terminal)."""
    return any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers)


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class Progress:
    """A long job's progress, rate and ETA: a tqdm bar when `terminal` (default: stderr is one and
    the log format is text), otherwise INFO log lines on `logger` (at the first step, at most every `interval` seconds
    after, and at `close`). `total` None: an open-ended job (a miner's rounds), with no ETA."""

    def __init__(
        self,
        job: str,
        unit: str,
        total: int | None = None,
        *,
        logger: logging.Logger | None = None,
        interval: float = 10.0,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.unit = unit
        self.total = total
        self.done = 0
        self.fields: dict[str, Any] = {}
        """The latest fields given to `advance` (shown with the rate)."""
        self.logger = logger or logging.getLogger("potchain.progress")
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._logged_at: float | None = None
        self._bar: Any = None
        if terminal is None:
            terminal = _is_terminal(sys.stderr) and not _logs_json()
        if terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=job, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        """Steps per second so far."""
        elapsed = self.clock() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (None for an open-ended job, or before any step)."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate

    def advance(self, steps: int = 1, total: int | None = None, **fields: Any) -> None:
        """`steps` more done (the total now `total`, if given); `fields` are shown beside the rate."""
        self.done += steps
        if total is not None:
            self.total = total
        self.fields = fields
        if self._bar is not None:
            if total is not None:
                self._bar.total = total
            if fields:
                self._bar.set_postfix({name: _short(value) for name, value in fields.items()}, refresh=False)
            self._bar.update(steps)
            return
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= self.interval:
            self._logged_at = now
            self._log(finished=False)

    def close(self) -> None:
        """The job ended: close the bar, or log the final line (total time and rate)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        self._log(finished=True)

    def _log(self, finished: bool) -> None:
        rate, eta = self.rate, self.eta_seconds
        of = f"/{self.total}" if self.total is not None else ""
        message = f"{self.job}: {self.done}{of} {self.unit}, {_short(rate)} {self.unit}/s"
        if finished:
            message += f", done in {self.clock() - self.started:.1f} s"
        elif eta is not None:
            message += f", eta {eta:.0f} s"
        message += "".join(f", {name} {_short(value)}" for name, value in self.fields.items())
        extra = {"job": self.job, "done": self.done, "total": self.total, "unit": self.unit, "rate": round(rate, 4),
                 "eta_seconds": None if finished or eta is None else round(eta, 1), **self.fields}  # fmt: skip
        self.logger.info(message, extra=extra)


def _short(value: Any) -> Any:
    """A float for people: whole above 1,000, else four significant digits."""
    if not isinstance(value, float):
        return value
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


CATCH_UP_HEIGHTS = 4
"""A node this many heights or more behind its peers reports its sync's progress."""


class CatchUp:
    """The progress of a node importing many heights from its peers (sync): reported (a
    `Progress` of job "sync") from the first height imported while at least `threshold`
    heights behind the peer's head, until that head is reached."""

    def __init__(self, threshold: int = CATCH_UP_HEIGHTS, **options: Any) -> None:
        self.threshold = threshold
        self.options = options
        """Passed on to each `Progress` (logger, interval, terminal, clock)."""
        self.progress: Progress | None = None
        self.first = 0
        """The first height of the catch-up being reported."""

    def imported(self, height: int, target: int) -> None:
        """Height `height` was imported; the peer's head is at `target`."""
        target = max(target, height)
        if self.progress is None:
            if target - height < self.threshold:
                return
            self.first = height
            self.progress = Progress("sync", "heights", total=target - height + 1, **self.options)
        self.progress.advance(1, total=target - self.first + 1, height=height, target=target)
        if height >= target:
            self.progress.close()
            self.progress = None
