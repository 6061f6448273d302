"""Run a plan's jobs with memory bounded by tensors, not models.

Each job reads its inputs (one tensor per model), stacks them in float32 on the
compute device, calls the method's pure function, casts and hands the result to a
sink (the sharded writer, or a dict for in-memory merges). Jobs run on a small
thread pool; a byte budget caps what is in flight, so peak memory is a few tensors
times the number of inputs, whatever the model size.

Two things keep the CPU path near the cost of reading and writing the bytes
(measured in docs/benchmarks.md):

* Row blocks. A method declared ``elementwise`` (rows independent) gets large tensors
  in blocks of about ``BLOCK_ELEMENTS`` entries per input: the inputs stay in their
  file dtype, only one block is float32, and the block's temporaries stay in the CPU
  cache. Results are bit-identical to the whole-tensor path (same ops per element).
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
from alloykit.plan.planner import Plan, TensorJob, tensor_seed
from alloykit.progress import Progress

Sink = Callable[[str, torch.Tensor], None]
#: receives a job's side outputs (group -> tensor) for methods declared ``side_outputs``
SideSink = Callable[[str, dict[str, torch.Tensor]], None]

#: bytes of working memory in flight (estimated by ``job_cost``); with the interpreter and
#: the heap's slack on top, a 4-input 1.1B merge stays under 2 GB resident at this figure
DEFAULT_BUDGET = 3 << 29  # 1.5 GiB

#: entries per input in one row block of an elementwise job (1 MiB of float32)
BLOCK_ELEMENTS = 1 << 18

#: keep freed memory in the heap while merging (see ``_tuned_malloc``)
TUNE_MALLOC = True


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def block_rows(job: TensorJob, plan: Plan, device: torch.device) -> int | None:
    """Rows per block when ``job`` runs in row blocks, or None to run it whole.

    Only CPU jobs of ``elementwise`` methods with more than one block of entries; a block
    is a multiple of 64 rows where it can be, so that vector loops see the same lanes.
    """
    block_elements = BLOCK_ELEMENTS
    method = plan.method
    if (job.copy or device.type != "cpu" or not method.elementwise or method.side_outputs or len(job.shape) == 0
            or job.stats or job.vocab is not None):
        return None
    rows = job.shape[0]
    row_len = _numel(job.shape[1:])
    if rows < 2 or row_len == 0 or rows * row_len <= block_elements:
        return None
    step = max(1, block_elements // row_len)
    if step >= 64:
        step -= step % 64
    return step if step < rows else None


def job_cost(plan: Plan, job: TensorJob, device: torch.device | None = None) -> int:
    """Working bytes of one job: the float32 stack and base, the output, and room for two
    float32 temporaries of one input's size in the method (for a job in row blocks: its
    inputs in their file dtype, the output, and one block of all that)."""
    n = _numel(job.shape)
    k = len(job.sources) + (1 if job.base else 0)
    step = block_rows(job, plan, device or torch.device("cpu"))
    if step is None:
        stats = sum(_numel(plan.checkpoints[s.model].info(s.tensor).shape) for s in job.stats or ())
        remap = n * 4 * 2 * k if job.vocab is not None else 0  # the gathered rows and each model's own
        return n * (4 * k + 8) + 4 * stats + job.out_bytes + remap
    cks = plan.checkpoints
    srcs = job.sources + ([job.base] if job.base else [])
    in_bytes = sum(cks[s.model].info(s.tensor).nbytes for s in srcs)
    block = step * _numel(job.shape[1:])
    return in_bytes + job.out_bytes + block * (4 * k + 8)


def stack_numel(job: TensorJob) -> int:
    """float32 entries of a job's stack and base (what ``compute_job`` takes from ``workspace``)."""
    return (len(job.sources) + (1 if job.base is not None else 0)) * _numel(job.shape)


def compute_job(
    plan: Plan, job: TensorJob, device: torch.device, fail_on_nonfinite: bool = False,
    workspace: torch.Tensor | None = None, side_sink: SideSink | None = None,
) -> torch.Tensor:
    """The merged tensor of one job (on the CPU, in the job's output dtype).

    ``workspace``: a float32 CPU buffer of at least ``stack_numel(job)`` entries to hold
    the stack and the base (fresh memory when None). ``side_sink`` receives the job's side
    outputs, if its method emits any (moved to the CPU).
    """
    cks = plan.checkpoints
    if job.copy:
        return cks[job.sources[0].model].read(job.sources[0].tensor).to(job.out_dtype)
    step = block_rows(job, plan, device)
    if step is not None:
        return _compute_blocks(plan, job, step, fail_on_nonfinite)
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
        if t is not None and not _all_finite(t):
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
                   role=job.role)
    result = plan.method.fn(x)
    if tuple(result.shape) != tuple(job.shape):
        raise AssertionError(f"method {plan.method.name} returned shape {list(result.shape)} for '{job.name}' {list(job.shape)}")
    if not _all_finite(result):
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


def _compute_blocks(plan: Plan, job: TensorJob, step: int, fail_on_nonfinite: bool) -> torch.Tensor:
    """``compute_job`` for an elementwise method, ``step`` rows at a time.

    The same operations run on each block as on the whole tensor, so the result is
    bit-identical; only one block of the float32 stack exists at a time.
    """
    cks = plan.checkpoints
    inputs = [cks[s.model].read(s.tensor) for s in job.sources]  # file dtype: 2 bytes an entry for bf16
    base = cks[job.base.model].read(job.base.tensor) if job.base is not None else None
    rows, rest = job.shape[0], tuple(job.shape[1:])
    row_len = _numel(rest)
    k = len(inputs)
    stack_buf = torch.empty(k * step * row_len, dtype=torch.float32)
    base_buf = torch.empty(step * row_len, dtype=torch.float32) if base is not None else None
    out = torch.empty(job.shape, dtype=job.out_dtype)
    bad = {"an input": False, "the base": False, "the merged result": False}
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * row_len
        stack = stack_buf[: k * n].view(k, r1 - r0, *rest)  # contiguous, also for the last, shorter block
        for i, t in enumerate(inputs):
            stack[i].copy_(t[r0:r1])
        b = None
        if base_buf is not None:
            b = base_buf[:n].view(r1 - r0, *rest)
            b.copy_(base[r0:r1])
        for label, t in (("an input", stack), ("the base", b)):
            if t is not None and not bad[label] and not _all_finite(t):
                where = _culprits(plan, job, t is b, t)
                bad[label] = where or True
                if fail_on_nonfinite:  # the whole-tensor path raises before computing, too
                    _nonfinite(f"tensor '{job.name}': {label} holds NaN or Inf{where}", True)
        x = MergeInput(job.name, stack, b, job.params, job.model_params, None, owned=True, role=job.role)
        res = plan.method.fn(x)
        if tuple(res.shape) != tuple(stack.shape[1:]):
            raise AssertionError(f"method {plan.method.name} returned shape {list(res.shape)} for a block of '{job.name}' {list(stack.shape[1:])}")
        if not bad["the merged result"] and not _all_finite(res):
            bad["the merged result"] = True
        out[r0:r1].copy_(res)
    for label, found in bad.items():  # one warning per tensor, in the whole-tensor path's order
        if found:
            _nonfinite(f"tensor '{job.name}': {label} holds NaN or Inf{found if isinstance(found, str) else ''}", fail_on_nonfinite)
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction pass, no temporary: a finite sum means finite entries (an overflowing
    sum of finite entries is confirmed element-wise before anything is reported)."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


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
) -> None:
    """Compute every job (except those in ``skip``) and pass each result to ``sink``
    (and its side outputs, if the method emits any, to ``side_sink``)."""
    device = torch.device(device)
    jobs = [j for j in plan.jobs if not (skip and j.name in skip)]
    # parallelism comes from jobs (threads=1: none): intra-op threads on top would oversubscribe
    # the cores, and cost more than they give on the small ops of blocked passes
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _tuned_malloc():
            if threads > 1:
                return _run_parallel(plan, jobs, sink, device, threads, budget_bytes, progress, fail_on_nonfinite, side_sink)
            prog = _progress(jobs, progress)
            slab = _Slab(min(budget_bytes, max((stack_numel(j) for j in jobs), default=0) * 4))
            for job in jobs:
                with slab.region(plan, job, device) as workspace:
                    out = compute_job(plan, job, device, fail_on_nonfinite, workspace, side_sink)
                sink(job.name, out)
                prog.update(1, job.out_bytes)
    finally:
        torch.set_num_threads(previous)


def _progress(jobs: list[TensorJob], enabled: bool) -> Progress:
    return Progress("merge", len(jobs), unit="tensors", total_bytes=sum(j.out_bytes for j in jobs), enabled=enabled)


def _run_parallel(plan: Plan, jobs: list[TensorJob], sink: Sink, device: torch.device, threads: int, budget_bytes: int,
                  progress: bool, fail_on_nonfinite: bool, side_sink: SideSink | None = None) -> None:
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

    def work(job: TensorJob, cost: int) -> None:
        try:
            with slab.region(plan, job, device) as workspace:
                out = compute_job(plan, job, device, fail_on_nonfinite, workspace, side_sink)
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
        for job in order:
            if errors:
                break
            cost = costs[job.name]
            acquire(cost)
            futures.append(pool.submit(work, job, cost))
        wait(futures)
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
        whole = not job.copy and device.type == "cpu" and numel > 0 and block_rows(job, plan, device) is None
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
