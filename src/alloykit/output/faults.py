"""Test support: fault injection into the writing of an output folder, driven by the environment.

The reliability suite kills or interrupts real runs at exact points, in subprocesses:

- ``ALLOYKIT_FAULT_KILL_AT=PHASE``: the process signals itself when it reaches the named
  phase (``fault_point``): planned, journal-part, tensors-written, metadata-written,
  journal-removed, target-moved-aside, renamed;
- ``ALLOYKIT_FAULT_KILL_AFTER=N``: the process signals itself after N tensors are computed
  and handed to the output (``after_tensors``): merges, ``merge --output-lora`` and
  ``extract-lora`` alike;
- ``ALLOYKIT_FAULT_SIGNAL=INT|TERM``: the signal sent (default KILL): INT and TERM show
  what a user's Ctrl-C or a scheduler's SIGTERM does at that point.

Nothing else in the library reads these variables. Unset, a phase costs one environment
lookup and the tensor hook is not installed.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import torch

KILL_AT = "ALLOYKIT_FAULT_KILL_AT"
KILL_AFTER = "ALLOYKIT_FAULT_KILL_AFTER"
SIGNAL = "ALLOYKIT_FAULT_SIGNAL"


def _signal_self() -> None:
    name = os.environ.get(SIGNAL, "KILL").upper()
    os.kill(os.getpid(), getattr(signal, "SIG" + name.removeprefix("SIG")))


def fault_point(name: str) -> None:
    """Signal this process here when ``ALLOYKIT_FAULT_KILL_AT`` names this phase."""
    if os.environ.get(KILL_AT) == name:
        _signal_self()


def after_tensors(sink: Callable[[str, torch.Tensor], None]) -> Callable[[str, torch.Tensor], None]:
    """``sink``, signalling this process once ``ALLOYKIT_FAULT_KILL_AFTER`` tensors went through it."""
    after = os.environ.get(KILL_AFTER)
    if not after:
        return sink
    limit, count, lock = int(after), [0], threading.Lock()

    def hooked(name: str, tensor: torch.Tensor) -> None:
        sink(name, tensor)
        with lock:
            count[0] += 1
            fire = count[0] == limit
        if fire:
            _signal_self()

    return hooked
