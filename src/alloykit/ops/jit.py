"""The compiler behind alloykit's fast kernels: numba, when it is installed and allowed.

Why numba (docs/benchmarks.md, "Kernel technology"): a merge's cost on the CPU is passes
over memory, and the fast paths fuse several of torch's passes into one loop (delta,
magnitude histogram, mask, sign election, disjoint sum), branch-free so that LLVM
vectorizes it. numba compiles such loops from Python at first use, ships binary wheels on
PyPI for Linux (x86-64, aarch64), macOS (arm64) and Windows for every supported Python, so
it installs without a compiler, and caches what it compiled on disk. torch.compile needs a
C++ compiler at run time, a C extension one at install time.

``jit(fn)`` compiles ``fn`` with ``nogil`` (the executor's threads run kernels in
parallel) and an on-disk cache, lazily: nothing is compiled, and numba is not even
imported, until a kernel first runs. Where numba is missing, or ``ALLOYKIT_NO_JIT=1``,
``available()`` is False and every caller takes the reference (torch) path instead, which
gives the same bytes (tests/test_fast_paths.py runs both).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

_log = logging.getLogger(__name__)


@functools.cache
def available() -> bool:
    """Whether the fast kernels can run: numba importable and not disabled."""
    if os.environ.get("ALLOYKIT_NO_JIT", "") not in ("", "0"):
        return False
    if importlib.util.find_spec("numba") is None:
        _log.info("numba is not installed: merges use the reference kernels (pip install 'alloykit[fast]' for the fast ones)")
        return False
    return True


_compile_lock = threading.Lock()


class _Lazy:
    """A kernel compiled on its first call (numba imported then, not at import time)."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]):
        self.fn = fn
        self.options = options
        self.compiled: Callable[..., Any] | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            with _compile_lock:
                if self.compiled is None:
                    _resolve_helpers(self.fn.__globals__)
                    self.compiled = self.dispatcher()
        return self.compiled(*args)

    def dispatcher(self) -> Callable[..., Any]:
        """The numba dispatcher (created once; it compiles per argument types when called)."""
        if self.compiled is None:
            import numba

            self.compiled = numba.njit(**self.options)(self.fn)
        return self.compiled


def jit(fn: Callable[..., Any] | None = None, *, inline: bool = False) -> Any:
    """Decorator: compile with numba (nopython, nogil, cached) on first call.

    ``inline=True`` marks a helper that kernels call: it becomes an
    ``njit(inline="always")`` function, swapped into its module's namespace before the
    first kernel of that module compiles (numba reads helpers from the kernel's globals).
    Called from Python, a helper is plain Python.
    """

    def deco(f: Callable[..., Any]) -> Any:
        if inline:
            return _InlineHelper(f)
        return _Lazy(f, {"nogil": True, "cache": True, "error_model": "numpy"})

    return deco(fn) if fn is not None else deco


class _InlineHelper:
    """A helper of numba kernels, until ``_resolve_helpers`` replaces it by its numba version."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _resolve_helpers(namespace: dict[str, Any]) -> None:
    import numba

    for name, obj in list(namespace.items()):
        if isinstance(obj, _InlineHelper):
            namespace[name] = numba.njit(inline="always", cache=True)(obj.fn)
        elif isinstance(obj, _Lazy):  # a kernel that other kernels of the module call
            namespace[name] = obj.dispatcher()
