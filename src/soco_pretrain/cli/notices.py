"""Where the library's notices go when it runs as the ``soco`` command.

The modules report through ``logging`` (loggers under ``soco_pretrain``); without a handler,
Python drops their INFO lines ("N images ... use the whole image") and prints warnings bare. The
command gives them one plain handler on stdout, the channel of its progress lines, so a notice
appears in order with them and in a redirected log; errors stay on stderr.
"""

from __future__ import annotations

import logging
import sys

LOGGER = "soco_pretrain"


class _StdoutHandler(logging.StreamHandler):
    """Writes to the current ``sys.stdout`` (looked up per record, so a replaced stdout, as in
    tests or a notebook, still gets the lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler assigns it; the current stdout wins
        pass


def show_notices(level: int = logging.INFO) -> None:
    """Send ``soco_pretrain`` log records of ``level`` and above to stdout as plain lines.
    Idempotent: calling it again (``main`` run twice in one process) replaces the handler."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _StdoutHandler):
            logger.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
