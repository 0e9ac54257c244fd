"""The one exception hierarchy: every error the ``soco`` command turns into one line.

- :class:`UserError` (exit status 2): input the user can fix -- a missing folder, a bad config
  value, an unreadable checkpoint, weights of the wrong shape.
- :class:`RunError` (exit status 1): the run itself failed -- a non-finite loss, a distributed
  set-up that did not come up.

``soco_pretrain.cli.main`` catches :class:`SocoError` once and prints ``soco: error: MESSAGE``;
messages are one line and name the file they are about (:class:`PathError`: ``PATH: REASON``).
Anything else is a bug and keeps its traceback. A subclass exists only where some caller tells
it apart by type (``ImageError``: an unreadable image is skipped, not fatal) or it carries data
beyond its message (``DatasetError.paths``, ``LeakError.pairs``); raise the base otherwise.
A re-raise keeps its cause (``raise ... from exc``): the command prints one line anyway.
"""

from __future__ import annotations


class SocoError(Exception):
    """Base of every error soco reports as one line; ``exit_code`` is the command's status."""

    exit_code = 1

    def one_line(self) -> str:
        return one_line(self)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line. An error re-raised from a DataLoader worker carries the
    worker's whole traceback ("Caught X in DataLoader worker process 0. Original Traceback ...");
    only its own message, the traceback's last line without the class name, is kept."""
    text = str(exc).strip() or type(exc).__name__
    if "Original Traceback (most recent call last):" in text:
        last = text.splitlines()[-1].strip()
        head, sep, message = last.partition(": ")
        text = message if sep and " " not in head else last
    return " ".join(text.split())


class UserError(SocoError, ValueError):
    """Bad input (files, options, config values): exit status 2. A ValueError, too, for callers
    that validate with ``except ValueError``."""

    exit_code = 2


class PathError(UserError):
    """A file that cannot be used: ``str()`` is one line ``PATH: REASON``; ``path`` and ``reason``
    are kept, and it pickles (loader workers raise it in another process)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class RunError(SocoError, RuntimeError):
    """The run failed for a reason other than its input (non-finite loss, distributed set-up)."""

    exit_code = 1


class NonFiniteLossError(RunError):
    """The loss, or the weights about to be checkpointed, became NaN or infinite; nothing was
    saved after it (one line, names the last good checkpoint)."""
