"""Shared CLI plumbing: user-facing errors become one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from nearl_rt.errors import NearlError

EXIT_USER_ERROR = 2


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None, *,
            prog: str = "nearl-rt") -> int:
    """Run `main(argv)`; print NearlError/OSError/ValueError as `prog: error: ...` and return exit code 2."""
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (NearlError, OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
