"""Logging set-up shared by ``qdd-cli`` and `qdd.api` (and so by the demo it runs).

qdd's own INFO lines (DEBUG with ``--verbose``) go to stderr; other libraries keep their
own handlers, less the messages `qdd.quiet` lists as not applying (all shown with
``--verbose``). `VERBOSE_ENV` carries ``--verbose`` into commands run in-process (the demo)
and into DDP's child processes. The demo's steps run `warnings_only`: its own step lines say
where it is, so no library's progress lines (qdd's, Lightning's) come between them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

#: Set by ``--verbose`` so that the commands a demo runs in-process stay verbose too.
VERBOSE_ENV = "QDD_VERBOSE"


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


class _Unhandled(logging.Filter):
    """Pass only records no handler below the root printed: Python's own last-resort rule."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.getLogger():
            if logger.handlers or not logger.propagate:
                return False
            logger = logger.parent
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes (like Python's last resort), so
    a caller that swaps stderr (tests, notebooks, a closed capture) never gets a dead stream."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _reopen_closed_streams() -> None:
    """Point library handlers whose stream was closed at the current stderr.

    Lightning binds a StreamHandler to the ``sys.stderr`` of its import; when a caller that
    runs several commands in one process swaps stderr (pytest, notebooks), its next log line
    would fail with "I/O operation on closed file" instead of being printed.
    """
    for logger in list(logging.Logger.manager.loggerDict.values()):
        for handler in getattr(logger, "handlers", ()):
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and getattr(stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one first


def configure_logging(verbose: bool) -> None:
    """qdd's lines on stderr, each library message once, the listed few dropped unless
    ``verbose``; safe to call again (each command of a demo or a test does)."""
    logger = logging.getLogger("qdd")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    root = logging.getLogger()
    if not root.handlers:
        # What Python prints for unhandled WARNINGs anyway, in place: without it, the first
        # library to call logging.warning() (open_clip does) installs basicConfig's handler,
        # and every qdd (and Lightning) warning is printed twice from then on.
        fallback = _StderrHandler()
        fallback.setLevel(logging.WARNING)
        fallback.addFilter(_Unhandled())
        root.addHandler(fallback)
    _reopen_closed_streams()
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    from qdd.quiet import silence

    silence(quiet=not verbose)


@contextlib.contextmanager
def warnings_only(quiet: bool = True) -> Iterator[None]:
    """While the block runs (when ``quiet``), every logger's INFO and DEBUG records are
    dropped, warnings and errors shown; the process's setting is restored after it.

    A level on the root logger would not do: qdd's logger and Lightning's have levels and
    handlers of their own, and a library imported during the block sets up new ones.
    """
    before = logging.root.manager.disable
    if quiet:
        logging.disable(max(before, logging.INFO))
    try:
        yield
    finally:
        logging.disable(before)
