"""A merge spread over a Ray cluster: one Ray task per output shard, one output folder.

The driver plans once (``MergeRequest.plan``: headers only), fixes the shard layout and the
fingerprint exactly as a local merge does (``alloykit.output.model``), and opens the same
crash-safe ``OutputFolder``. The plan goes to the object store once (``ray.put``); each
task receives it by reference with the name of its shard, and:

1. checks that what it sees is what the driver planned: the alloykit version, the output's
   working folder (so the output is on storage this node shares with the driver), and
   every input file's size and safetensors header (a SHA-256 of its first bytes), which
   holds for a shared filesystem and for per-node copies of the same files alike;
2. computes the shard's tensors with the ordinary executor, reading its inputs from those
   paths (tensors never travel through Ray), into ``NAME.part-<pid>`` in the working
   folder, fsyncs it and renames it to the shard's name;
3. returns the shard's size and SHA-256.

The driver journals each shard as its result arrives, so a killed driver's run continues
with ``--resume`` from the shards already journaled (any Ray task retried after a worker
died rewrites its shard whole). Every randomized method draws from one generator per
tensor seeded by (seed, tensor name), so the bytes do not depend on which worker computed
what, or in which order: they are the bytes of the local merge.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alloykit import __version__
from alloykit.card import write_metadata
from alloykit.distributed.cluster import LOCAL, connect
from alloykit.errors import AlloyError, CheckpointError, OutputError
from alloykit.io.durable import file_sha256, fsync_dir
from alloykit.io.writer import ShardedWriter, ShardLayout, plan_shards
from alloykit.output.faults import fault_point
from alloykit.output.folder import OutputFolder
from alloykit.output.model import WriteOptions, Written, _files_of, plan_fingerprint
from alloykit.plan.executor import run_jobs
from alloykit.plan.planner import Plan
from alloykit.progress import Progress
from alloykit.request import MergeRequest

_log = logging.getLogger(__name__)

#: test-only: a path; the first task to create this file kills its own worker process (SIGKILL)
#: halfway through its shard, so the test sees Ray retry the shard on another worker
KILL_WORKER_ONCE = "ALLOYKIT_FAULT_RAY_KILL_WORKER_ONCE"
#: a task is retried this many times when its worker dies (node lost, process killed, OOM)
MAX_RETRIES = 3
HEADER_PROBE = 1 << 16


@dataclass(frozen=True)
class RayOptions:
    """Where the cluster is (``None``/"local": start one here; "auto"; or an address) and
    how many CPUs a local one gets."""

    address: str | None = LOCAL
    num_cpus: int | None = None


@dataclass
class RayWritten(Written):
    """What a distributed merge wrote, with each shard's task result (host, pid, seconds, CPU seconds)."""

    shards: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    head_sha256: str  # of the first bytes: the safetensors header and then some


def _head_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(HEADER_PROBE)).hexdigest()


def input_files(plan: Plan) -> list[InputFile]:
    """Every file the plan reads, with what a worker must find there."""
    out = []
    for ck in plan.checkpoints:
        for f in _files_of(ck):
            out.append(InputFile(str(f), os.stat(f).st_size, _head_digest(str(f))))
    return out


def _check_inputs(files: list[InputFile], version: str, tmp: str) -> None:
    """On the worker, before computing: the node sees the driver's inputs and output folder."""
    host = socket.gethostname()
    if version != __version__:
        raise AlloyError(f"node {host}: alloykit {__version__} is installed, the driver runs {version}; "
                         "install the same version on every node")
    if not os.path.isdir(tmp):
        raise OutputError(f"node {host}: the output's working folder '{tmp}' is not visible here; the output "
                          "folder must be on storage every node shares (NFS, a parallel filesystem)")
    for f in files:
        try:
            size = os.stat(f.path).st_size
        except OSError:
            raise CheckpointError(f"node {host}: input file '{f.path}' is missing; every node needs the inputs at "
                                  "the same path (a shared filesystem, or a copy on each node)") from None
        if size != f.size or _head_digest(f.path) != f.head_sha256:
            raise CheckpointError(f"node {host}: input file '{f.path}' differs from the driver's ({size} bytes here, "
                                  f"{f.size} there, or a different header); copy the same files to every node")


def merge_shard(plan: Plan, shard: ShardLayout, tmp: str, files: list[InputFile], version: str,
                kill_marker: str | None = None) -> dict[str, Any]:
    """Compute one shard into the working folder ``tmp``; returns its name, size and SHA-256.

    Runs in a Ray worker (or anywhere: it is a plain function of a plan and a shard)."""
    t0, cpu0 = time.monotonic(), _cpu_seconds()
    _check_inputs(files, version, tmp)
    folder = Path(tmp)
    part = ShardLayout(f"{shard.filename}.part-{os.getpid()}", shard.names, shard.prefix,
                       {n: o for n, o in shard.offsets.items()}, shard.size)
    wanted = set(shard.names)
    jobs = [j for j in plan.jobs if j.name in wanted]
    writer = ShardedWriter(folder, [part], {j.name: j.out_dtype for j in jobs}, {j.name: j.shape for j in jobs})
    sink = writer.write
    if kill_marker:
        sink = _kill_once_halfway(sink, kill_marker, len(jobs))
    writer.open()
    try:
        run_jobs(plan, sink, threads=1, progress=False, skip={j.name for j in plan.jobs if j.name not in wanted})
    finally:
        writer.close()
        plan.close()
    os.rename(folder / part.filename, folder / shard.filename)  # the part was fsynced when its last tensor landed
    fsync_dir(folder)
    return {"filename": shard.filename, "size": shard.size, "sha256": file_sha256(folder / shard.filename),
            "host": socket.gethostname(), "pid": os.getpid(), "seconds": time.monotonic() - t0,
            "cpu_seconds": _cpu_seconds() - cpu0}


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _kill_once_halfway(sink, marker: str, n_jobs: int):
    count = [0]

    def hooked(name, tensor):
        sink(name, tensor)
        count[0] += 1
        if count[0] == max(1, n_jobs // 2):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return hooked


def merge_on_ray(request: MergeRequest, out: str | os.PathLike, options: WriteOptions = WriteOptions(),
                 ray_options: RayOptions = RayOptions()) -> RayWritten:
    """Plan ``request`` here (once) and write it with the shards computed on Ray."""
    plan = request.plan()
    try:
        return write_model_on_ray(plan, out, options, ray_options, names_dir=request.recipe_dir)
    finally:
        plan.close()


def write_model_on_ray(plan: Plan, out: str | os.PathLike, options: WriteOptions = WriteOptions(),
                       ray_options: RayOptions = RayOptions(), *, names_dir: Path | None = None) -> RayWritten:
    """``write_model`` with each shard computed by a Ray task: the same folder, bytes and
    journal as the local merge, so ``--resume`` works across the two."""
    o = options
    if o.max_shard_size <= 0:
        raise OutputError(f"--max-shard-size {o.max_shard_size}: must be a positive number of bytes")
    if plan.method.side_outputs:
        raise AlloyError(f"--ray: merge method '{plan.method.name}' writes side outputs, which a distributed merge "
                         "does not gather; merge it without --ray")
    if o.device != "cpu":
        raise AlloyError(f"--ray with --device {o.device}: distributed merges run on the workers' CPUs; drop --device")
    folder = OutputFolder(out, overwrite=o.overwrite, what="merge")
    shards = plan_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], o.max_shard_size)
    fingerprint = plan_fingerprint(plan, "".join(f"{s.filename}|{s.size};" for s in shards))
    if folder.already_done(fingerprint, o.resume):
        return RayWritten(folder.target, already_done=True)
    files = input_files(plan)  # before connecting: a missing input is the driver's error first
    ray = connect(ray_options.address, num_cpus=ray_options.num_cpus)
    folder.total_shards = len(shards)
    with folder.writing(fingerprint, resume=o.resume, space=plan.out_bytes) as journal:
        reused = len(journal.shards)
        if o.resume and o.progress:
            _log.info(f"resuming: {reused} of {len(shards)} shards already complete")
        reports = _run_tasks(ray, plan, [s for s in shards if s.filename not in journal.shards], folder, journal, files, o)
        for stray in folder.tmp.glob("*.part-*"):  # what a killed worker was writing when it died
            stray.unlink()
        ShardedWriter(folder.tmp, shards, {}, {}).write_index()
        fault_point("tensors-written")
        write_metadata(plan, folder.tmp, copy_tokenizer=o.copy_tokenizer, fingerprint=fingerprint, names_dir=names_dir)
        fault_point("metadata-written")
        folder.commit()
    return RayWritten(folder.target, reused_shards=reused, shards=reports)


def _run_tasks(ray: Any, plan: Plan, todo: list[ShardLayout], folder: OutputFolder, journal: Any,
               files: list[InputFile], o: WriteOptions) -> list[dict[str, Any]]:
    """Each shard's task result (name, size, SHA-256, host, pid, seconds, CPU seconds), as they came."""
    if not todo:
        return []
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(merge_shard)
    plan_ref = ray.put(plan)  # once: every task gets it by reference
    files_ref = ray.put(files)
    marker = os.environ.get(KILL_WORKER_ONCE)
    # biggest shards first, so the last ones to finish are small
    todo = sorted(todo, key=lambda s: -s.size)
    pending = {task.remote(plan_ref, s, str(folder.tmp), files_ref, __version__, marker): s for s in todo}
    workers: set[tuple[str, int]] = set()
    reports: list[dict[str, Any]] = []
    progress = Progress("merge on ray", len(todo), unit="shards", total_bytes=sum(s.size for s in todo),
                        enabled=o.progress)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, AlloyError):  # a worker's check failed: its one line, not a traceback
                        raise cause from None
                    raise
                journal.complete(result["filename"], result["size"], result["sha256"])
                fault_point("shard-journaled")
                workers.add((result["host"], result["pid"]))
                reports.append(result)
                progress.what = f"merge on ray ({len(workers)} worker(s))"
                progress.update(1, result["size"])
                _log.debug(f"{result['filename']}: {result['host']} pid {result['pid']}, {result['seconds']:.1f}s "
                           f"({result['cpu_seconds']:.1f} CPU s)")
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        progress.close()
    return reports
