"""Spectral read-ahead: the next tensors' spectra on worker threads.

mergekit 0.1.5 executes its graph one task at a time, so on the CPU a merge would
compute one spectrum at a time, on one core for most of it (``dsytrd``, ``dsterf``
and ``dstemr`` hardly use a second thread; 84 spectra of the 200M benchmark took
11.3 s in sequence and 5.8 s on two threads). While ``mergekit-yaml`` runs an lssf
recipe, the first fused tensor looks up the schedule of the running
``mergekit.graph.Executor`` (read from its frame; nothing in mergekit is changed) and
starts worker threads. Each worker loads the aligned and unaligned inputs of an
upcoming lssf tensor with mergekit's own ``LoadTensor`` task and computes its
``safety_factors`` (spectrum, entropy rank, weighted projection of delta) through
``lapack``, which releases the GIL. When mergekit reaches that tensor, the kernel
takes the result only if the worker's inputs are bit for bit the tensors mergekit
passed (same dtype, same values) and the factor parameters (eta, max_rank, rank,
weight_max, rank_rule, fusion) are the same;
otherwise it computes them itself. Only the final ``W_ft + alpha * left @ right`` is
left to mergekit's thread.
So read-ahead changes when the work is done, not what is computed.

``MERGEKIT_LSSF_READ_AHEAD``: number of worker threads (default: the usable cores, at
most 4; 0 turns read-ahead off). Memory: a running worker holds one weight's inputs,
its delta in float32 and float64 and its Gram matrix; a finished one, until mergekit
takes it, the inputs. For the largest weight of a 70B Llama (28672 x 8192, bfloat16)
that is about 4.3 GB per running worker, so 1 or 0 bounds memory on such models.
While workers run, SciPy's BLAS is limited to one thread per call (two threads each
asking for all cores would oversubscribe them); ``run_merge`` restores it when it
returns or fails. Only CPU merges read ahead; with ``--cuda`` nothing changes.

The workers call the same routines on the same inputs as mergekit's thread would; the
one conceivable difference is BLAS rounding that depends on its thread count (none
was seen: the 200M benchmark's output is bit-identical with and without read-ahead).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit_lssf.kernel import SafetyFactors, safety_factors

LOG = logging.getLogger("mergekit_lssf")

ENV_VAR = "MERGEKIT_LSSF_READ_AHEAD"
MAX_DEFAULT_WORKERS = 4

#: Largest Gram matrix (the weight's smaller side) for which a merge reads ahead. One
#: BLAS thread per worker pays off while the float64 Gram (32 MiB at 2048) stays in
#: cache; beyond it one spectrum on all cores is faster. Two weights on a 2-core VM,
#: in sequence / on two threads: 1024^2 0.34 / 0.23 s, 2048^2 1.78 / 1.50 s,
#: 3072^2 5.87 / 6.62 s, 4096^2 12.05 / 13.76 s (benchmarks/RESULTS.md).
MAX_GRAM = 2048


def configured_workers() -> int:
    """Worker threads from ``MERGEKIT_LSSF_READ_AHEAD`` (default: cores, at most 4)."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return min(cores, MAX_DEFAULT_WORKERS) if cores >= 2 else 0
    try:
        workers = int(raw)
    except ValueError:
        workers = -1
    if workers < 0:
        from mergekit_lssf.parameters import LSSFConfigError

        raise LSSFConfigError(
            f"{ENV_VAR} must be a whole number of worker threads >= 0 (0: off), got {raw!r}"
        )
    return workers


@dataclass
class Precomputed:
    """A worker's result: the inputs it used and ``safety_factors`` of them."""

    aligned: torch.Tensor
    unaligned: torch.Tensor
    factors: SafetyFactors


@dataclass
class _Job:
    """One upcoming lssf tensor. ``state``: pending, running, claimed (by mergekit's
    thread, which computes it itself), done or dropped."""

    index: int
    name: str
    aligned: Any  # mergekit LoadTensor tasks
    unaligned: Any
    dtype: Optional[str]
    settings: Dict[str, Any]  # FACTOR_PARAMETERS -> value, as the kernel will get them
    state: str = "pending"
    result: Optional[Precomputed] = None
    done: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self):
        self.done = threading.Event()


def _running_executor():
    """``(executor, index of the running task)`` of the mergekit Executor whose
    ``_run`` is on this thread's stack, or None."""
    from mergekit.graph import Executor

    code = Executor._run.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            local = frame.f_locals
            return local.get("self"), local.get("idx")
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=64)
def _header_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape in a .safetensors file, from its header (no data read)."""
    import safetensors

    with safetensors.safe_open(path, framework="pt") as fp:
        return {name: tuple(fp.get_slice(name).get_shape()) for name in fp.keys()}


def _gram_size(load) -> Optional[int]:
    """``min(shape)`` of the matrix a mergekit ``LoadTensor`` reads (0 for other ranks);
    None if unknown (not safetensors, or a name mergekit converts on load)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache.loaders[load.model].index
    for name in [load.tensor, *(load.aliases or ()), *(load.tied_names or ())]:
        shard = index.tensor_paths.get(name)
        if shard is not None:
            if not shard.endswith(".safetensors"):
                return None
            shape = _header_shapes(os.path.join(index.base_path, shard)).get(name)
            if shape is None:
                return None
            return min(shape) if len(shape) == 2 else 0
    return None


def _jobs_after(executor, position: int) -> List[_Job]:
    """The lssf tensors the executor will run after ``position`` that a worker can
    load on its own (mergekit's plain loads from models already in its cache,
    data-free); none when a weight's Gram matrix would exceed ``MAX_GRAM``."""
    from mergekit.io.tasks import GatherTensors, LoaderCache, LoadTensor
    from mergekit.merge_methods.base import TensorMetadata
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_lssf.merge_method import might_be_fused
    from mergekit_lssf.parameters import DEFAULTS, FACTOR_PARAMETERS
    from mergekit_lssf.registration import METHOD_NAME

    _header_shapes.cache_clear()  # files may have changed since the last merge
    jobs: List[_Job] = []
    for handle in executor.schedule.tasks[position + 1 :]:
        task = handle.task()
        if not isinstance(task, ExecuteMergeMethodTask) or task.method_name != METHOD_NAME:
            continue
        gather = task.gather_tensors
        params = dict(task.parameters.items())
        if not isinstance(gather, GatherTensors) or params.get("subspace") is not None:
            continue
        if gather.device not in (None, "cpu"):
            continue
        if not might_be_fused(TensorMetadata.from_weight_info(task.output_weight)):
            continue
        loads, arguments = {}, gather.arguments()
        for model, info in gather.weight_info.items():
            role = dict(task.input_parameters.get(model, {}).items()).get("role")
            load = arguments.get(f"{model}:{info.name}")
            if role in ("aligned", "unaligned") and isinstance(load, LoadTensor):
                loads.setdefault(role, []).append(load)
        if any(len(loads.get(r, [])) != 1 for r in ("aligned", "unaligned")):
            continue  # mergekit's thread reports the recipe error
        if not all(l.model in LoaderCache.loaders for l in (loads["aligned"][0], loads["unaligned"][0])):
            continue
        size = _gram_size(loads["aligned"][0])
        if size is None or size > MAX_GRAM:
            return []  # big weights: one spectrum at a time on every core is faster
        if size == 0:
            continue  # not a matrix (a norm, a bias): nothing for a worker to load
        jobs.append(
            _Job(
                index=len(jobs),
                name=task.output_weight.name,
                aligned=loads["aligned"][0],
                unaligned=loads["unaligned"][0],
                dtype=task.dtype,
                settings={k: params.get(k, DEFAULTS[k]) for k in FACTOR_PARAMETERS},
            )
        )
    return jobs


class ReadAhead:
    """``workers`` threads computing ``safety_factors`` of ``jobs`` in schedule order,
    starting none more than ``2 * workers`` tensors after the last one mergekit took
    (so that a worker rarely waits, and finished results stay few)."""

    def __init__(self, executor, jobs: List[_Job], workers: int):
        self.executor = executor
        self.jobs = jobs
        self.by_name = {job.name: job for job in jobs}
        self.depth = 2 * workers  # tensors a worker may start ahead of the last one taken
        self.taken = -1
        self.next_index = 0
        self.hits = 0
        self.closed = False
        self.cond = threading.Condition()
        self.blas_limit = None
        self.threads: List[threading.Thread] = []
        if jobs and workers > 0:
            from threadpoolctl import threadpool_limits

            import mergekit_lssf.lapack  # noqa: F401  loads SciPy's BLAS, so that it is limited

            self.blas_limit = threadpool_limits(limits=1, user_api="blas")
            for i in range(min(workers, len(jobs))):
                thread = threading.Thread(target=self._work, name=f"lssf-read-ahead-{i}", daemon=True)
                thread.start()
                self.threads.append(thread)
            LOG.info("lssf: computing spectra of %d tensors ahead on %d threads (%s)",
                     len(jobs), min(workers, len(jobs)), ENV_VAR)

    # worker side
    def _next_job(self) -> Optional[_Job]:
        with self.cond:
            while not self.closed:
                while self.next_index < len(self.jobs) and self.jobs[self.next_index].state != "pending":
                    self.next_index += 1
                if self.next_index >= len(self.jobs):
                    return None
                job = self.jobs[self.next_index]
                if job.index <= self.taken + self.depth:
                    job.state = "running"
                    self.next_index += 1
                    return job
                self.cond.wait()
            return None

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                result = _compute(job)
            except Exception as error:  # mergekit's thread recomputes and reports it
                LOG.debug("lssf read-ahead of %s failed: %s", job.name, error)
                result = None
            with self.cond:
                if job.state == "running":  # after close: "done" with no result
                    job.result, job.state = (None if self.closed else result), "done"
            job.done.set()

    # mergekit's side
    def take(self, name, aligned, unaligned, settings: Dict[str, Any]) -> Optional[Precomputed]:
        """The worker's result for tensor ``name`` if it used exactly these inputs and
        parameters; None when mergekit's thread has to compute the spectrum itself."""
        job = self.by_name.get(name)
        if job is None:
            return None
        with self.cond:
            for earlier in self.jobs[self.taken + 1 : job.index]:  # never taken: free them
                earlier.state, earlier.result = "dropped", None
            self.taken = max(self.taken, job.index)
            claimed = job.state == "pending"
            if claimed:
                job.state = "claimed"
            self.cond.notify_all()
        if claimed:
            return None
        job.done.wait()
        with self.cond:
            result, job.result, job.state = job.result, None, "dropped"
        if result is None or job.settings != settings:
            return None
        if not (_same(result.aligned, aligned) and _same(result.unaligned, unaligned)):
            return None
        self.hits += 1
        return result

    def close(self) -> None:
        """Stop the workers and wait for them: a worker still inside a spectrum (LAPACK,
        GIL released) when the interpreter exits is killed there, and glibc's forced
        unwinding through C++ frames aborts the process ("terminate called without an
        active exception", exit -6) after the merge was written. A running job is at
        most one spectrum of a Gram matrix up to ``MAX_GRAM``, about 2 s."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            for job in self.jobs:
                job.result = None
            self.cond.notify_all()
        for thread in self.threads:  # close() runs on mergekit's thread, never a worker's
            thread.join()
        if self.blas_limit is not None:
            self.blas_limit.restore_original_limits()
        if self.jobs:
            LOG.info("lssf: %d of %d spectra were computed ahead", self.hits, len(self.jobs))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def _compute(job: _Job) -> Optional[Precomputed]:
    """Load the job's inputs as mergekit would and compute their ``safety_factors``."""
    from mergekit.common import dtype_from_name

    from mergekit_lssf.merge_method import count_non_finite

    a, u = job.aligned.execute(), job.unaligned.execute()
    if a is None or u is None or a.ndim != 2 or a.shape != u.shape or not a.is_floating_point():
        return None
    dtype = dtype_from_name(job.dtype) if job.dtype else torch.promote_types(a.dtype, u.dtype)
    a, u = a.to(dtype), u.to(dtype)
    if count_non_finite(a) or count_non_finite(u):
        return None
    factors = safety_factors(a, u, work_dtype=dtype, **job.settings)
    return Precomputed(a, u, factors)


class _Scope:
    """The read-ahead of the lssf ``run_merge`` in progress (at most one per process)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.workers = 0
        self.session: Optional[ReadAhead] = None

    def open(self) -> None:
        """Allow read-ahead until ``close``, with ``MERGEKIT_LSSF_READ_AHEAD`` workers."""
        workers = configured_workers()
        with self.lock:
            self._close_session()
            self.workers = workers

    def close(self) -> None:
        """Stop the workers and restore SciPy's BLAS threads (idempotent)."""
        with self.lock:
            self._close_session()
            self.workers = 0

    def _close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    def current(self) -> Optional[ReadAhead]:
        """The session for the running executor, started on its first lssf tensor."""
        with self.lock:
            workers = self.workers
            if workers <= 0:
                return None
            found = _running_executor()
            if found is None or found[0] is None or found[1] is None:
                return None
            executor, position = found
            if self.session is not None and self.session.executor is executor:
                return self.session
            self._close_session()
            jobs = []
            if getattr(executor, "math_device", torch.device("cpu")).type == "cpu":
                jobs = _jobs_after(executor, position)
            self.session = ReadAhead(executor, jobs, workers)
            return self.session


SCOPE = _Scope()


def precomputed(name: str, aligned: torch.Tensor, unaligned: torch.Tensor,
                settings: Dict[str, Any]) -> Optional[Precomputed]:
    """A worker's verified result for this tensor, or None (compute it here)."""
    if aligned.device.type != "cpu":
        return None
    session = SCOPE.current()
    if session is None:
        return None
    return session.take(name, aligned, unaligned, settings)
