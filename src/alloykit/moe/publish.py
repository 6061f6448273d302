"""Writing a mixture or routed-model folder through the project's one output folder (``alloykit.output``).

Both writers here produce a handful of files in one pass (no shards to resume), so the
folder's journal only carries a fingerprint naming what is written: the target is checked
before any work, everything is written in the locked temp folder beside it, and it is
renamed into place only when whole; on any error nothing is left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from alloykit.output.folder import OutputFolder


def publish(out: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False, space: int = 0,
            what: str = "mixture") -> Path:
    """Run ``write(folder)`` on a fresh temporary folder, then rename it to ``out``."""
    folder = OutputFolder(out, overwrite=overwrite, what=what)
    folder.already_done({"what": what}, resume=False)  # refuses a taken target before any work
    with folder.writing({"what": what}, space=space):
        write(folder.tmp)
        folder.commit()
    return folder.target
