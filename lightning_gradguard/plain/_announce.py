"""Events of a plain or Fabric loop, told once: on the terminal and through :mod:`logging`.

The Lightning callbacks print each event above the progress bar; a hand-written loop has no bar, and leaving the
line to the ``logging`` module alone loses it wherever the user's logging writes to a file only (or
``logging.config.dictConfig`` disabled the logger). :func:`announce_line` therefore writes the line to stderr
itself, and also hands the record to ``logging``, with one rule so that nobody sees it twice:

- a handler that will print the record on the terminal (a ``StreamHandler`` on stdout/stderr, as
  ``logging.basicConfig()`` installs, or absl's and rich's handlers, reached from the guard's logger at its level)
  already shows it: no own line;
- with no handler anywhere on the way up, the record is not emitted at all (Python's last-resort handler would print
  it a second time): the own line is the only one;
- otherwise (a log file, pytest's ``caplog``, a handler on an unrelated logger) both: one line on the terminal, the
  record where the user's configuration sends it.

With ``terminal=False`` only the record is emitted (plain ``logger.warning``: the user's configuration decides,
including Python's last resort when there is none). An active tqdm bar is cleared and redrawn around the line
(``tqdm.write``), as the callbacks' bar does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

__all__ = ["announce_line"]


def _handlers_up(logger: logging.Logger) -> Iterator[logging.Handler]:
    """Every handler a record of ``logger`` reaches (the propagation chain, as ``Logger.callHandlers`` walks it)."""
    current: logging.Logger | None = logger
    while current is not None:
        yield from current.handlers
        if not current.propagate:
            return
        current = current.parent


def _terminal_streams() -> tuple[object, ...]:
    return (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


def _shows_on_terminal(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Whether ``handler`` will print ``record`` on the terminal (stdout or stderr): a ``StreamHandler`` on one of
    them, absl's ``ABSLHandler`` (through its ``python_handler``) or rich's ``RichHandler`` (its ``console.file``)."""
    if record.levelno < handler.level or not handler.filter(record):
        return False
    inner = getattr(handler, "python_handler", None)
    if isinstance(inner, logging.Handler) and inner is not handler:
        return _shows_on_terminal(inner, record)
    stream = getattr(handler, "stream", None)
    if stream is None:
        stream = getattr(getattr(handler, "console", None), "file", None)
    return stream is not None and any(stream is s for s in _terminal_streams())


def _write(line: str) -> None:
    """``line`` on stderr, above an active tqdm bar if there is one."""
    tqdm_module = sys.modules.get("tqdm")
    bar_class = getattr(tqdm_module, "tqdm", None)
    if bar_class is not None and getattr(bar_class, "_instances", None):
        try:
            bar_class.write(line, file=sys.stderr)
            return
        except Exception:  # an unusual tqdm: a plain line is still better than none
            pass
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def announce_line(logger: logging.Logger, line: str, terminal: bool = True, level: int = logging.WARNING) -> None:
    """Tell the user about an event: ``line`` once on the terminal and as a ``logging`` record of ``logger``
    (see the module docstring for when each is done)."""
    if not terminal:
        logger.log(level, line)
        return
    handlers = list(_handlers_up(logger))
    shown = False
    if handlers and logger.isEnabledFor(level) and not logger.disabled:
        record = logging.LogRecord(logger.name, level, __file__, 0, line, None, None)
        shown = bool(logger.filter(record)) and any(_shows_on_terminal(h, record) for h in handlers)
        logger.log(level, line)
    if not shown:
        _write(line)
