"""The staged output folder: a convert writes into `.OUT.tmp-PID` beside OUT and renames it into
place only when everything is written, so OUT is never half-written.

A killed convert leaves its temporary folder behind; the next convert to the same OUT removes it
unless its process still runs or a convert on another host holds its lock file. An export kept for
inspection (a failed validation's, with its report) stays, and so does the `.OUT.old-PID` of a
replace that was cut short while OUT is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import SdexportError

LOCK_NAME = ".convert.lock"  # in a convert's temporary folder while it works
REPORT_NAME = "validation.json"  # a kept export's report (`convert --validate`): the folder stays for inspection


@contextlib.contextmanager
def staged_folder(out: Path, log: Callable[[str], None], keep: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Yield a fresh, locked temporary folder beside `out`; move it to `out` when the block ends well.

    On an exception of a type in `keep` the folder stays where it is; on any other it is removed.
    """
    remove_stale_temporaries(out, log)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise SdexportError(f"cannot write to {out.parent} ({e.strerror}): choose another -o") from e
    try:
        with folder_lock(tmp):
            yield tmp
        replace_folder(tmp, out)
    except keep:
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold a lock file in a convert's temporary folder while it works: process ids do not tell a
    convert on another host or in another container (same shared folder) from a killed one."""
    if os.name != "posix":
        yield
        return

    path = folder / LOCK_NAME
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def in_use(folder: Path) -> bool:
    """Whether a convert, here or on another host, holds the folder's lock file."""

    try:
        with open(folder / LOCK_NAME, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return False


def remove_stale_temporaries(out: Path, log: Callable[[str], None]) -> None:
    """Remove what converts to OUT left behind when killed (see the module docstring). POSIX only."""
    if os.name != "posix" or not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not path.is_dir() or path.is_symlink():
            continue
        if process_alive(int(pid)) or in_use(path):
            continue
        if (kind == "tmp" and (path / REPORT_NAME).is_file()) or (kind == "old" and not out.exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log(f"removed {path}, left by an interrupted convert")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an old OUT is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
