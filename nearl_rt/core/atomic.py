"""Write files so that a failure never leaves a partial file behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from nearl_rt.core.errors import NearlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise NearlError(f"cannot write {path}: directory {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise NearlError(f"cannot write {path}: {e.strerror} (choose a writable output path)") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path` (which must be absent or an empty folder); on success rename it onto
    `path`, on failure delete it: the folder appears whole or not at all."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise NearlError(f"{path} exists and is not an empty folder; choose a new one")
    if not parent.is_dir():
        raise NearlError(f"cannot write {path}: directory {parent} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise NearlError(f"cannot write {path}: {e.strerror} (choose a writable output path)") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder the mode mkdir would
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
