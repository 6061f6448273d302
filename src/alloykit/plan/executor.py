"""Run a plan's jobs with memory bounded by tensors, not models.

Each job reads its inputs (one tensor per model), stacks them in float32 on the
compute device, calls the method's pure function, casts and hands the result to a
sink (the sharded writer, or a dict for in-memory merges). Jobs run on a small
thread pool; a byte budget caps what is in flight, so peak memory is a few tensors
times the number of inputs, whatever the model size.

Two things keep the CPU path near the cost of reading and writing the bytes
(measured in docs/benchmarks.md):

* Streaming. On the CPU a tensor is read from its checkpoint file in blocks of rows
  (``Checkpoint.read_range``, about ``BLOCK_ELEMENTS`` entries per input), converted
  to float32 a block at a time, so its float32 working set is a few blocks, whatever its
  size, when its method has a fast path (``MethodSpec.streamed``: passes over the blocks
  with fused numba kernels, ``alloykit.methods.stream``; when numba is available,
  ``alloykit.ops.jit``) or is declared ``elementwise`` (rows independent: the reference
  function runs on each block). Either gives the reference's bytes; a fast path may
  decline a tensor, which then runs whole, as on other devices.
* The allocator. glibc serves every allocation above 32 MB with a fresh ``mmap`` and
  unmaps it on free, so each large temporary pays page faults and zeroing again
  (half the CPU time of a TIES merge went to the kernel). During ``run_jobs`` malloc
  keeps freed memory for reuse instead (``_tuned_malloc``); settings are restored
  and free memory returned to the system afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from alloykit.errors import NonFiniteError
from alloykit.io.checkpoint import Checkpoint
from alloykit.methods.registry import MergeInput
from alloykit.methods.stream import StreamInput
from alloykit.ops.finite import all_finite
from alloykit.plan.planner import TORCH_DTYPES, Plan, TensorJob, tensor_seed
from alloykit.progress import Progress

Sink = Callable[[str, torch.Tensor], None]
#: receives a job's side outputs (group -> tensor) for methods declared ``side_outputs``
SideSink = Callable[[str, dict[str, torch.Tensor]], None]
#: a tensor's output buffer by name (the writer's memory map of its bytes), or None
OutBuffer = Callable[[str], "torch.Tensor | None"]

#: bytes of working memory in flight (estimated by ``job_cost``); with the interpreter and
#: the heap's slack on top, a 4-input 1.1B merge stays under 2 GB resident at this figure
DEFAULT_BUDGET = 3 << 29  # 1.5 GiB

#: entries per input in one block of a streamed job (256 KiB of float32: with its
#: temporaries a block of four inputs stays in the CPU's L2 cache)
BLOCK_ELEMENTS = 1 << 16

#: keep freed memory in the heap while merging (see ``_tuned_malloc``)
TUNE_MALLOC = True


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def streams(job: TensorJob, plan: Plan, device: torch.device) -> bool:
    """Whether ``job`` is computed streamed (blocks of rows): on the CPU, for a method
    with a fast path (numba available) or an ``elementwise`` one, unless the job needs
    its whole tensor (statistics, a vocabulary remap, side outputs)."""
    method = plan.method
    fast = method.streamed is not None and method.streamed.usable()
    return ((fast or method.elementwise) and device.type == "cpu" and not job.copy and not job.stats
            and plan.stats_norms is None and not method.side_outputs and job.vocab is None
            and _numel(job.shape) > 0)


def block_rows(job: TensorJob, plan: Plan, device: torch.device) -> int | None:
    """Rows per block when ``job`` is streamed in more than one block, else None."""
    if not streams(job, plan, device):
        return None
    rows = job.shape[0] if len(job.shape) >= 2 else 1
    step = max(1, BLOCK_ELEMENTS // max(1, _numel(job.shape) // rows))
    return step if step < rows else None


def job_cost(plan: Plan, job: TensorJob, device: torch.device | None = None) -> int:
    """Working bytes of one job: the float32 stack and base, the output, and room for two
    float32 temporaries of one input's size in the method; for a streamed job the output,
    a few blocks, the fast path's scratch and the inputs it cannot read by rows."""
    n = _numel(job.shape)
    k = len(job.sources) + (1 if job.base else 0)
    if streams(job, plan, device or torch.device("cpu")):
        cks = plan.checkpoints
        srcs = job.sources + ([job.base] if job.base else [])
        whole = sum(cks[s.model].info(s.tensor).nbytes for s in srcs if not _can_read_range(cks[s.model], s.tensor))
        fast = plan.method.streamed
        scratch = fast.scratch_bytes(n, len(job.sources), mergekit_dtype(plan, job)) if fast and fast.usable() else 0
        return job.out_bytes + whole + scratch + 4 * (2 * k + 8) * min(n, BLOCK_ELEMENTS)
    stats = sum(_numel(plan.checkpoints[s.model].info(s.tensor).shape) for s in job.stats or ())
    remap = n * 4 * 2 * k if job.vocab is not None else 0  # the gathered rows and each model's own
    return n * (4 * k + 8) + 4 * stats + job.out_bytes + remap


def mergekit_dtype(plan: Plan, job: TensorJob) -> torch.dtype | None:
    """The dtype mergekit would merge ``job`` in: the recipe's ``dtype``, else its inputs'."""
    if plan.recipe.dtype:
        return TORCH_DTYPES[plan.recipe.dtype]
    src = job.sources[0] if job.sources else job.base
    return plan.checkpoints[src.model].info(src.tensor).dtype if src is not None else None


def stack_numel(job: TensorJob) -> int:
    """float32 entries of a job's stack and base (what ``compute_job`` takes from ``workspace``)."""
    return (len(job.sources) + (1 if job.base is not None else 0)) * _numel(job.shape)


def compute_job(
    plan: Plan, job: TensorJob, device: torch.device, fail_on_nonfinite: bool = False,
    workspace: torch.Tensor | None = None, side_sink: SideSink | None = None, stop: threading.Event | None = None,
    out_buffer: OutBuffer | None = None,
) -> torch.Tensor:
    """The merged tensor of one job (on the CPU, in the job's output dtype).

    ``workspace``: a float32 CPU buffer of at least ``stack_numel(job)`` entries to hold
    the stack and the base (fresh memory when None). ``side_sink`` receives the job's side
    outputs, if its method emits any (moved to the CPU). Once ``stop`` is set a streamed job
    raises ``Stopped`` before its next block (a whole-tensor job runs to its end).
    ``out_buffer(name)``: where a streamed job writes its output blocks (the output file's
    bytes, mapped), or None for fresh memory; the job returns that buffer.
    """
    cks = plan.checkpoints
    if job.copy:
        return cks[job.sources[0].model].read(job.sources[0].tensor).to(job.out_dtype)
    if streams(job, plan, device):
        out = _compute_streamed(plan, job, fail_on_nonfinite, stop, out_buffer)
        if out is not None:
            return out
    # the output buffer first: inputs in its dtype are read through it (no temporary per read)
    out = torch.empty(job.shape, dtype=job.out_dtype)
    k, n = len(job.sources), _numel(job.shape)
    if workspace is None or device.type != "cpu":
        workspace = torch.empty(stack_numel(job), dtype=torch.float32, device=device)
    stack = workspace[: k * n].view(k, *job.shape)
    remapped = None
    if job.vocab is not None:  # token-indexed: each model's rows gathered to the output vocabulary
        srcs = job.sources + ([job.base] if job.base is not None else [])
        remapped = job.vocab.gather(job.name, [cks[s.model].read(s.tensor) for s in srcs])
    for i, src in enumerate(job.sources):
        stack[i].copy_(remapped[i] if remapped else _read(cks[src.model], src.tensor, out))
    base = None
    if job.base is not None:
        base = workspace[k * n : (k + 1) * n].view(job.shape)
        base.copy_(remapped[-1] if remapped else _read(cks[job.base.model], job.base.tensor, out))
    del remapped
    for label, t in (("an input", stack), ("the base", base)):
        if t is not None and not all_finite(t):
            _nonfinite(f"tensor '{job.name}': {label} holds NaN or Inf{_culprits(plan, job, t is base, t)}", fail_on_nonfinite)
    gen = None
    if plan.method.randomized:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(plan.seed, job.name))
    stats = norms = None
    if job.stats:
        stats = torch.stack([cks[s.model].read(s.tensor).to(device, torch.float32) for s in job.stats])
    if plan.stats_norms is not None:
        norms = torch.tensor(plan.stats_norms, dtype=torch.float32, device=device)
    x = MergeInput(job.name, stack, base, job.params, job.model_params, gen, owned=True, stats=stats, stats_norms=norms,
                   role=job.role, compute_dtype=mergekit_dtype(plan, job))
    result = plan.method.fn(x)
    if tuple(result.shape) != tuple(job.shape):
        raise AssertionError(f"method {plan.method.name} returned shape {list(result.shape)} for '{job.name}' {list(job.shape)}")
    if not all_finite(result):
        _nonfinite(f"tensor '{job.name}': the merged result holds NaN or Inf", fail_on_nonfinite)
    if x.side and side_sink is not None:
        side_sink(job.name, {group: t.detach().to("cpu") for group, t in x.side.items()})
    return out.copy_(result)


def _read(ck, name: str, scratch: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` of checkpoint ``ck``, read into ``scratch`` when it is a safetensors
    tensor of scratch's dtype and shape (the caller copies it out before the next read)."""
    info = ck.info(name)
    if isinstance(ck, Checkpoint) and info.offset >= 0 and info.dtype == scratch.dtype and tuple(info.shape) == tuple(scratch.shape):
        return ck.read(name, out=scratch)
    return ck.read(name)


def _can_read_range(ck, name: str) -> bool:
    return isinstance(ck, Checkpoint) and ck.info(name).offset >= 0


class _RowSource:
    """Rows of one input tensor, read a block at a time from its file (whole tensors only
    for inputs that are not safetensors files: pickles, LoRA folds, state dicts)."""

    def __init__(self, ck, name: str, shape: tuple[int, ...], block_entries: int):
        self.ck, self.name = ck, name
        self.row_len = _numel(shape[1:]) if len(shape) >= 2 else _numel(shape)
        info = ck.info(name)
        if _can_read_range(ck, name):
            self.whole = None
            self.raw = torch.empty(block_entries, dtype=info.dtype)
        else:
            self.whole = ck.read(name).reshape(-1)

    def read(self, r0: int, r1: int, into: torch.Tensor) -> None:
        start, count = r0 * self.row_len, (r1 - r0) * self.row_len
        if self.whole is not None:
            into.copy_(self.whole[start : start + count])
            return
        raw = self.raw[:count]
        if raw.dtype == into.dtype:
            self.ck.read_range(self.name, start, count, into)
        else:
            into.copy_(self.ck.read_range(self.name, start, count, raw))


def _compute_streamed(plan: Plan, job: TensorJob, fail_on_nonfinite: bool,
                      stop: threading.Event | None = None, out_buffer: OutBuffer | None = None) -> torch.Tensor | None:
    """``compute_job`` through the method's fast path; None if it declines the tensor.

    Inputs are checked for NaN/Inf block by block on the first pass (later passes reread
    the same rows), with the whole-tensor path's messages.
    """
    cks = plan.checkpoints
    out = out_buffer(job.name) if out_buffer is not None else None
    if out is None:
        out = torch.empty(job.shape, dtype=job.out_dtype)
    seed = tensor_seed(plan.seed, job.name) if plan.method.randomized else None
    x = StreamInput(job.name, tuple(job.shape), len(job.sources), job.base is not None, job.params, job.model_params,
                    seed, lambda *a: None, out, BLOCK_ELEMENTS, mergekit_dtype(plan, job), job.role, stop)
    sources = [_RowSource(cks[s.model], s.tensor, tuple(job.shape), x.block_size) for s in job.sources]
    base = _RowSource(cks[job.base.model], job.base.tensor, tuple(job.shape), x.block_size) if job.base else None
    bad: dict[str, str] = {}  # label -> which model(s), once a block holds NaN or Inf
    checked = [0]

    def read_rows(r0: int, r1: int, stack: torch.Tensor, base_buf: torch.Tensor | None) -> None:
        for src, row in zip(sources, stack):
            src.read(r0, r1, row)
        if base is not None:
            base.read(r0, r1, base_buf)
        if r0 >= checked[0]:  # first pass: check what was read
            checked[0] = r1
            for label, t in (("an input", stack), ("the base", base_buf)):
                if t is not None and label not in bad and not all_finite(t):
                    where = _culprits(plan, job, t is base_buf, t)
                    bad[label] = where
                    if fail_on_nonfinite:
                        _nonfinite(f"tensor '{job.name}': {label} holds NaN or Inf{where}", True)

    x._read = read_rows
    fast = plan.method.streamed
    if fast is not None and fast.usable():
        if not fast.run(x):
            return None
    else:
        _rowwise(plan, job, x)
    for label in ("an input", "the base"):  # one warning per tensor, in the whole-tensor path's order
        if label in bad:
            _nonfinite(f"tensor '{job.name}': {label} holds NaN or Inf{bad[label]}", fail_on_nonfinite)
    if not all_finite(out):
        _nonfinite(f"tensor '{job.name}': the merged result holds NaN or Inf", fail_on_nonfinite)
    return out


def _rowwise(plan: Plan, job: TensorJob, x: StreamInput) -> None:
    """An ``elementwise`` method's function on each block of rows: the same operations on
    each entry as on the whole tensor, so the same bytes."""
    rest = tuple(job.shape[1:]) if len(job.shape) >= 2 else ()
    for block in x.blocks():
        rows = (block.row1 - block.row0, *rest) if rest or len(job.shape) >= 2 else tuple(job.shape)
        stack = torch.from_numpy(block.stack).view(x.k, *rows)
        base = torch.from_numpy(block.base).view(rows) if block.base is not None else None
        res = plan.method.fn(MergeInput(job.name, stack, base, job.params, job.model_params, None, owned=True,
                                        role=job.role, compute_dtype=x.compute_dtype))
        if tuple(res.shape) != rows:
            raise AssertionError(f"method {plan.method.name} returned shape {list(res.shape)} for a block of "
                                 f"'{job.name}' {list(rows)}")
        x.write(block, res)


def _culprits(plan: Plan, job: TensorJob, is_base: bool, t: torch.Tensor) -> str:
    """" (model 'X')": the input(s) holding the NaN/Inf, looked for only once one is found
    (reliability: the message names the file as well as the tensor)."""
    if is_base:
        return f" (model '{plan.labels[job.base.model]}')"
    names = [f"'{plan.labels[s.model]}'" for s, row in zip(job.sources, t) if not bool(torch.isfinite(row).all())]
    return f" (model {', '.join(names)})" if names else ""


def _nonfinite(msg: str, fail: bool) -> None:
    if fail:
        raise NonFiniteError(msg + " (--fail-on-nonfinite)")
    warnings.warn(msg, stacklevel=3)


def run_jobs(
    plan: Plan,
    sink: Sink,
    *,
    device: str | torch.device = "cpu",
    threads: int = 2,
    budget_bytes: int = DEFAULT_BUDGET,
    progress: bool = True,
    fail_on_nonfinite: bool = False,
    skip: set[str] | None = None,
    side_sink: SideSink | None = None,
    out_buffer: OutBuffer | None = None,
) -> None:
    """Compute every job (except those in ``skip``) and pass each result to ``sink``
    (and its side outputs, if the method emits any, to ``side_sink``); streamed jobs write
    their output into ``out_buffer(name)`` where it gives one."""
    device = torch.device(device)
    jobs = [j for j in plan.jobs if not (skip and j.name in skip)]
    # parallelism comes from jobs (threads=1: none): intra-op threads on top would oversubscribe
    # the cores, and cost more than they give on the small ops of blocked passes
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _tuned_malloc():
            if threads > 1:
                return _run_parallel(plan, jobs, sink, device, threads, budget_bytes, progress, fail_on_nonfinite, side_sink,
                                     out_buffer)
            prog = _progress(jobs, progress)
            slab = _Slab(min(budget_bytes, max((stack_numel(j) for j in jobs), default=0) * 4))
            for job in jobs:
                with slab.region(plan, job, device) as workspace:
                    out = compute_job(plan, job, device, fail_on_nonfinite, workspace, side_sink, out_buffer=out_buffer)
                sink(job.name, out)
                prog.update(1, job.out_bytes)
    finally:
        torch.set_num_threads(previous)


def _progress(jobs: list[TensorJob], enabled: bool) -> Progress:
    return Progress("merge", len(jobs), unit="tensors", total_bytes=sum(j.out_bytes for j in jobs), enabled=enabled)


def _run_parallel(plan: Plan, jobs: list[TensorJob], sink: Sink, device: torch.device, threads: int, budget_bytes: int,
                  progress: bool, fail_on_nonfinite: bool, side_sink: SideSink | None = None,
                  out_buffer: OutBuffer | None = None) -> None:
    """Jobs on a thread pool, biggest first, with at most ``budget_bytes`` of working memory in flight."""
    prog = _progress(jobs, progress)
    cond = threading.Condition()
    in_flight = [0]

    def acquire(cost: int) -> None:
        with cond:
            # a job larger than the budget runs alone rather than never
            cond.wait_for(lambda: in_flight[0] == 0 or in_flight[0] + cost <= budget_bytes)
            in_flight[0] += cost

    def release(cost: int) -> None:
        with cond:
            in_flight[0] -= cost
            cond.notify_all()

    errors: list[BaseException] = []
    slab = _Slab(budget_bytes)
    # set when the main thread is interrupted (Ctrl-C, SIGTERM): the workers see no signal, so
    # streamed jobs check it between blocks and end there instead of finishing their tensor
    stop = threading.Event()

    def work(job: TensorJob, cost: int) -> None:
        try:
            if stop.is_set():
                return
            with slab.region(plan, job, device) as workspace:
                out = compute_job(plan, job, device, fail_on_nonfinite, workspace, side_sink, stop, out_buffer)
            sink(job.name, out)
            prog.update(1, job.out_bytes)
        except BaseException as err:  # reported by the submitting thread, after in-flight jobs end
            errors.append(err)
        finally:
            release(cost)

    # biggest jobs first: the budget then packs the small ones around them
    costs = {j.name: job_cost(plan, j, device) for j in jobs}
    order = sorted(jobs, key=lambda j: -costs[j.name])
    # torch's intra-op thread count is per thread (OpenMP): each worker sets its own to 1, as
    # run_jobs does for the calling thread; left at the default, a worker's reductions (an SVD's)
    # split differently from the serial path's, and the bytes depended on the thread count
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alloykit", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:
        futures: list[Future] = []
        try:
            for job in order:
                if errors:
                    break
                cost = costs[job.name]
                acquire(cost)
                futures.append(pool.submit(work, job, cost))
            wait(futures)
        except BaseException:  # KeyboardInterrupt: the pool's exit waits only for blocks in flight
            stop.set()
            for f in futures:
                f.cancel()
            raise
    if errors:
        raise errors[0]


class _Slab:
    """The float32 stacks of the jobs in flight, carved first-fit from one reused buffer.

    Stacks are a merge's largest allocations. Taken from the heap one job after another,
    with two threads and the methods' temporaries in between, they leave holes that a
    later stack does not fit, and the heap grows well past what is in use. From one slab
    (as large as the budget, resident only as far as it is used) they cannot fragment
    the heap; a stack that finds no room in it gets fresh memory.
    """

    ALIGN = 16  # entries (64 bytes)

    def __init__(self, nbytes: int):
        self.numel = max(0, nbytes // 4)
        self.buf: torch.Tensor | None = None
        self.free = [(0, self.numel)]  # (offset, length), sorted by offset
        self.lock = threading.Lock()

    def _take(self, numel: int) -> int | None:
        numel = -(-numel // self.ALIGN) * self.ALIGN
        with self.lock:
            for i, (off, length) in enumerate(self.free):
                if length >= numel:
                    self.free[i : i + 1] = [(off + numel, length - numel)] if length > numel else []
                    if self.buf is None:
                        self.buf = torch.empty(self.numel, dtype=torch.float32)
                    return off
        return None

    def _give(self, off: int, numel: int) -> None:
        numel = -(-numel // self.ALIGN) * self.ALIGN
        with self.lock:
            self.free.append((off, numel))
            self.free.sort()
            merged = [self.free[0]]
            for o, n in self.free[1:]:
                if merged[-1][0] + merged[-1][1] == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            self.free = merged

    @contextlib.contextmanager
    def region(self, plan: Plan, job: TensorJob, device: torch.device) -> Iterator[torch.Tensor | None]:
        """A float32 buffer for ``job``'s stack and base, or None (the job allocates its own;
        a copy or a job in row blocks needs none)."""
        numel = stack_numel(job)
        whole = not job.copy and device.type == "cpu" and numel > 0 and not streams(job, plan, device)
        off = self._take(numel) if whole else None
        if off is None:
            yield None
            return
        try:
            yield self.buf[off : off + numel]
        finally:
            self._give(off, numel)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_malloc_lock = threading.Lock()
_malloc_users = [0]


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no mallopt parameters to tune)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _tuned_malloc() -> Iterator[None]:
    """Keep freed memory in the heap for reuse while merging (glibc only).

    Large tensors otherwise each get a fresh ``mmap`` (above 32 MB glibc always maps),
    whose pages are faulted in and zeroed by the kernel on first touch and unmapped on
    free: on the 2-core benchmark machine that was half the CPU time of a TIES merge.
    With mmap off, one arena and a high trim threshold, a freed block is reused as is.
    Resident memory is then the heap's high-water mark, which the byte budget bounds
    (plus fragmentation; docs/benchmarks.md measures it). On exit the defaults come
    back and free memory is returned to the system.
    """
    libc = _glibc() if TUNE_MALLOC else None
    if libc is None:
        yield
        return
    with _malloc_lock:
        _malloc_users[0] += 1
        if _malloc_users[0] == 1:
            libc.mallopt(_M_ARENA_MAX, 1)
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        with _malloc_lock:
            _malloc_users[0] -= 1
            if _malloc_users[0] == 0:
                # glibc's defaults; the mmap threshold keeps its current value, and threads that
                # picked an arena meanwhile keep sharing it (glibc fixes its arena limit once)
                libc.mallopt(_M_MMAP_MAX, 65536)
                libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
                libc.mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))
                libc.malloc_trim(0)
