"""Run a plan's jobs with memory bounded by tensors, not models.

Each job reads its inputs (one tensor per model), stacks them in float32 on the
compute device, calls the method's pure function, casts and hands the result to a
sink (the sharded writer, or a dict for in-memory merges). Jobs run on a small
thread pool; a byte budget caps what is in flight, so peak memory is a few tensors
times the number of inputs, whatever the model size.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from alloykit.errors import NonFiniteError
from alloykit.methods.registry import MergeInput
from alloykit.plan.planner import Plan, TensorJob, tensor_seed

Sink = Callable[[str, torch.Tensor], None]

DEFAULT_BUDGET = 2 << 30  # bytes of working memory in flight


def job_cost(plan: Plan, job: TensorJob) -> int:
    """Working bytes of one job: the fp32 stack, the base, the method's temporaries."""
    n = 1
    for d in job.shape:
        n *= d
    k = len(job.sources) + (1 if job.base else 0)
    return n * 4 * (2 * k + 3)


def compute_job(plan: Plan, job: TensorJob, device: torch.device, fail_on_nonfinite: bool = False) -> torch.Tensor:
    """The merged tensor of one job (on the CPU, in the job's output dtype)."""
    cks = plan.checkpoints
    if job.copy:
        return cks[job.sources[0].model].read(job.sources[0].tensor).to(job.out_dtype)
    k = len(job.sources)
    stack = torch.empty((k, *job.shape), dtype=torch.float32, device=device)
    for i, src in enumerate(job.sources):
        stack[i].copy_(cks[src.model].read(src.tensor))
    base = None
    if job.base is not None:
        base = cks[job.base.model].read(job.base.tensor).to(device=device, dtype=torch.float32)
    for label, t in (("input", stack), ("base", base)):
        if t is not None and not _all_finite(t):
            _nonfinite(f"tensor '{job.name}': an {label} holds NaN or Inf", fail_on_nonfinite)
    gen = None
    if plan.method.randomized:
        gen = torch.Generator(device=device)
        gen.manual_seed(tensor_seed(plan.seed, job.name))
    x = MergeInput(job.name, stack, base, job.params, job.model_params, gen, owned=True)
    out = plan.method.fn(x)
    if tuple(out.shape) != tuple(job.shape):
        raise AssertionError(f"method {plan.method.name} returned shape {list(out.shape)} for '{job.name}' {list(job.shape)}")
    if not _all_finite(out):
        _nonfinite(f"tensor '{job.name}': the merged result holds NaN or Inf", fail_on_nonfinite)
    return out.to(device="cpu", dtype=job.out_dtype)


def _all_finite(t: torch.Tensor) -> bool:
    """One reduction pass, no temporary: a finite sum means finite entries (an overflowing
    sum of finite entries is confirmed element-wise before anything is reported)."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _nonfinite(msg: str, fail: bool) -> None:
    if fail:
        raise NonFiniteError(msg + " (--fail-on-nonfinite)")
    warnings.warn(msg, stacklevel=3)


class Progress:
    """Tensors and bytes done, rate and time left, on stderr (rate-limited)."""

    def __init__(self, total_jobs: int, total_bytes: int, enabled: bool = True, stream=None):
        self.total_jobs, self.total_bytes = total_jobs, max(total_bytes, 1)
        self.jobs = self.bytes = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.start = self._last = time.monotonic()
        self._lock = threading.Lock()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.jobs += 1
            self.bytes += nbytes
            now = time.monotonic()
            interval = 0.2 if self._tty else 5.0
            if self.enabled and (now - self._last >= interval or self.jobs == self.total_jobs):
                self._last = now
                self._print(now)

    def _print(self, now: float) -> None:
        el = max(now - self.start, 1e-9)
        rate = self.bytes / el
        left = (self.total_bytes - self.bytes) / rate if rate > 0 else 0.0
        line = (
            f"[{self.jobs}/{self.total_jobs} tensors] {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB "
            f"{rate / 1e6:.0f} MB/s, {el:.0f}s elapsed, ~{left:.0f}s left"
        )
        end = "\n" if (not self._tty or self.jobs == self.total_jobs) else ""
        print(("\r" if self._tty else "") + line, end=end, file=self.stream, flush=True)


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
) -> None:
    """Compute every job (except those in ``skip``) and pass each result to ``sink``."""
    device = torch.device(device)
    jobs = [j for j in plan.jobs if not (skip and j.name in skip)]
    if threads > 1:
        # parallelism comes from jobs; intra-op threads on top would oversubscribe the cores
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run_parallel(plan, jobs, sink, device, threads, budget_bytes, progress, fail_on_nonfinite)
        finally:
            torch.set_num_threads(previous)
    prog = Progress(len(jobs), sum(j.out_bytes for j in jobs), enabled=progress)
    for job in jobs:
        out = compute_job(plan, job, device, fail_on_nonfinite)
        sink(job.name, out)
        prog.update(job.out_bytes)


def _run_parallel(plan: Plan, jobs: list[TensorJob], sink: Sink, device: torch.device, threads: int, budget_bytes: int,
                  progress: bool, fail_on_nonfinite: bool) -> None:
    """Jobs on a thread pool, biggest first, with at most ``budget_bytes`` of working memory in flight."""
    prog = Progress(len(jobs), sum(j.out_bytes for j in jobs), enabled=progress)
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

    def work(job: TensorJob, cost: int) -> None:
        alone = cost > budget_bytes  # nothing else runs beside it: let its ops use every thread
        try:
            if alone:
                torch.set_num_threads(threads)
            out = compute_job(plan, job, device, fail_on_nonfinite)
            if alone:
                torch.set_num_threads(1)
            sink(job.name, out)
            prog.update(job.out_bytes)
        except BaseException as err:  # reported by the submitting thread, after in-flight jobs end
            errors.append(err)
        finally:
            release(cost)

    # biggest jobs first: the budget then packs the small ones around them
    order = sorted(jobs, key=lambda j: -job_cost(plan, j))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="alloykit") as pool:
        futures: list[Future] = []
        for job in order:
            if errors:
                break
            cost = job_cost(plan, job)
            acquire(cost)
            futures.append(pool.submit(work, job, cost))
        wait(futures)
    if errors:
        raise errors[0]
