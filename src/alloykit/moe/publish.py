"""Writing a folder atomically (until the output-folder module lands: merge.py's temp-folder path).

One small function so the mixture builder and the routed-model writer share one path:
everything is written in ``.NAME.alloykit-tmp`` beside the target (locked), and renamed
into place only when whole; on any error the working folder is removed, so the target
is either absent or complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from alloykit.errors import OutputError
from alloykit.merge import _check_space, _lock, _replace, temp_dir_for


def publish(out: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False, space: int = 0) -> Path:
    """Run ``write(folder)`` on a fresh temporary folder, then rename it to ``out``."""
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the folder '{out.parent}': {err.strerror or err}") from None
    if space:
        _check_space(out.parent, space)
    tmp = temp_dir_for(out)
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    tmp.mkdir(exist_ok=True)
    lock = _lock(tmp)
    try:
        for p in tmp.iterdir():  # what an interrupted run left
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        try:
            write(tmp)
            _replace(tmp, out)
        except OSError as err:
            raise OutputError(f"cannot write the output in '{tmp}': {err.strerror or err} (free disk space or choose another folder)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return out
