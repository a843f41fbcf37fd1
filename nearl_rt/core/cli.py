"""Shared CLI plumbing: user-facing errors become one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Callable, Optional, Sequence

from nearl_rt.core.errors import NearlError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, *,
            prog: str = "nearl-rt") -> int:
    """Run `main(argv)`; print NearlError/OSError/ValueError as `prog: error: ...` and return exit code 2.
    Warnings show as one line `prog: warning: ...` each, every distinct message once."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("once", append=True)  # after any filter set by the user (or pytest)
            return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (NearlError, OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        warnings.formatwarning = formatwarning


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to sys.stderr as it is when each record comes (callers and pytest swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr(name: str) -> None:
    """Show logger `name`'s INFO lines (and its children's) on stderr, each once: one handler however often a
    CLI's main runs in a process, and no propagation to a root handler some library configured."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        logger.addHandler(_CurrentStderr())
    logger.propagate = False
