"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A reader (or a crash) never sees a half-written file; used for checkpoints, shop state and
every run-directory artifact.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

TEMP_SUFFIX = ".tmp"  # temp files are ".<name>.<random>.tmp" beside their target


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files an interrupted `atomic_write` left in ``folder``; returns what was removed.

    Call only where no other process writes into ``folder`` at the same time (e.g. at start-up).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[int, str]]:
    """A temp file beside ``path`` (open fd, name), renamed over ``path`` on success, removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[io.BufferedWriter], None], *, mode: int | None = None,
                 fsync: bool = True) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path`` and rename it over ``path`` when done.

    ``fsync=False`` skips flushing the bytes to the disk before the rename: a killed process still
    leaves the old or the new file, but an OS crash or power loss may leave an empty or old one.
    Only for files whose loss costs work, never results.
    """
    path = Path(path)
    with _temp_beside(path) as (fd, tmp):
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def atomic_keep_copy(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` a copy of ``src`` atomically while ``src`` stays in place (a hard link when it can).

    Rotating a file with a rename leaves a moment with no ``src``; a crash then loses the current file.
    """
    src, dst = Path(src), Path(dst)
    with _temp_beside(dst) as (fd, tmp):
        os.close(fd)
        os.unlink(tmp)  # os.link will not overwrite
        try:
            os.link(src, tmp)
        except FileNotFoundError:
            raise
        except OSError:  # a filesystem without hard links: copy the bytes instead
            shutil.copyfile(src, tmp)
    return dst


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data), mode=mode, fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode, fsync=fsync)


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index) atomically."""
    return atomic_write_text(path, frame.to_csv(index=False))


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """Write a DataFrame as Parquet atomically."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return atomic_write_bytes(path, buf.getvalue())
