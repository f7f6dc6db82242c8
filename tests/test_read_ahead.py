"""Spectral read-ahead: its results are used only when they are exactly what the
kernel would compute, and its settings, threads and BLAS limits are handled cleanly.
(End to end, bit-identical output with and without it: test_end_to_end.py.)"""

from typing import Dict

import pytest
import torch
from threadpoolctl import threadpool_info

import mergekit_lssf.lapack  # noqa: F401  SciPy's BLAS loaded before the limits are read
from mergekit_lssf import read_ahead
from mergekit_lssf.kernel import safety_factors
from mergekit_lssf.parameters import LSSFConfigError
from mergekit_lssf.read_ahead import ENV_VAR, Precomputed, ReadAhead, _Job, configured_workers

PARAMS = dict(eta=0.9, max_rank=8, rank=None, weight_max=1.5, rank_rule="entropy", fusion="add")


class _Load:
    """Stands in for mergekit's LoadTensor task: ``execute()`` returns a tensor."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.calls = 0

    def execute(self):
        self.calls += 1
        return self.tensor


def _pair(seed, shape=(48, 40), dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(dtype)
    u = (a.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    return a, u


def _job(index, a, u, dtype=None, **overrides):
    params = {**PARAMS, **overrides}
    return _Job(index=index, name=f"w{index}", aligned=_Load(a), unaligned=_Load(u), dtype=dtype, settings=params)


def _limits() -> Dict[str, int]:
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.mark.parametrize("raw, expected", [("0", 0), ("1", 1), ("3", 3), (" 2 ", 2)])
def test_worker_setting(monkeypatch, raw, expected):
    monkeypatch.setenv(ENV_VAR, raw)
    assert configured_workers() == expected


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_bad_worker_setting_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(ENV_VAR, raw)
    with pytest.raises(LSSFConfigError, match=f"{ENV_VAR} must be a whole number .* got '{raw}'"):
        configured_workers()


def test_default_workers_follow_the_cores(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(read_ahead.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert configured_workers() == read_ahead.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(read_ahead.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert configured_workers() == 2
    monkeypatch.setattr(read_ahead.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert configured_workers() == 0


def test_workers_compute_exactly_what_the_kernel_would():
    pairs = [_pair(seed, shape) for seed, shape in enumerate([(48, 40), (40, 48), (64, 64), (33, 70), (70, 33)])]
    jobs = [_job(i, a, u) for i, (a, u) in enumerate(pairs)]
    before = _limits()
    session = ReadAhead(None, jobs, workers=2)
    try:
        assert session.blas_limit is not None
        assert all(n == 1 for n in _limits().values())  # one BLAS thread per worker
        for i, (a, u) in enumerate(pairs):
            got = session.take(f"w{i}", a.clone(), u.clone(), PARAMS)
            assert got is not None, i
            want = safety_factors(a, u, work_dtype=a.dtype, **PARAMS)
            assert torch.equal(got.factors.left, want.left) and torch.equal(got.factors.right, want.right)
            assert got.factors.info.choice == want.info.choice
            assert torch.equal(got.factors.sigma, want.sigma)
        assert session.hits == len(pairs)
    finally:
        session.close()
    assert _limits() == before  # restored
    assert all(job.aligned.calls == 1 for job in jobs)


def _finished(job, a, u, dtype=torch.bfloat16):
    job.result = Precomputed(a.to(dtype), u.to(dtype), safety_factors(a, u, work_dtype=dtype, **PARAMS))
    job.state = "done"
    job.done.set()
    return job


@pytest.mark.parametrize(
    "change",
    ["aligned value", "unaligned value", "dtype", "eta", "max_rank", "rank", "weight_max", "rank_rule", "fusion"],
)
def test_a_result_for_other_inputs_or_parameters_is_refused(change):
    a, u = _pair(0)
    session = ReadAhead(None, [_finished(_job(0, a, u), a, u)], workers=0)
    params = dict(PARAMS)
    if change == "aligned value":
        a = a.clone()
        a[3, 4] = a[3, 4] + 1
    elif change == "unaligned value":
        u = u.clone()
        u[0, 0] = -u[0, 0] + 1
    elif change == "dtype":
        a, u = a.float(), u.float()
    else:
        params[change] = {"eta": 0.8, "max_rank": 4, "rank": 2, "weight_max": 1.0, "rank_rule": "noise_floor", "fusion": "restore"}[change]
    assert session.take("w0", a, u, params) is None
    assert session.take("w0", a, u, params) is None  # and it is gone, not reused


def test_the_same_result_is_accepted_and_unknown_tensors_are_not_found():
    a, u = _pair(1)
    session = ReadAhead(None, [_finished(_job(0, a, u), a, u)], workers=0)
    assert session.take("other", a, u, PARAMS) is None
    assert session.take("w0", a.clone(), u.clone(), PARAMS) is not None


def test_a_tensor_no_worker_started_is_left_to_the_caller():
    a, u = _pair(2)
    jobs = [_job(0, a, u), _job(1, a, u)]
    session = ReadAhead(None, jobs, workers=0)  # no threads: nothing gets started
    assert session.take("w1", a, u, PARAMS) is None
    assert jobs[1].state == "claimed" and jobs[0].state == "dropped"
    assert jobs[1].aligned.calls == 0


def test_non_finite_or_non_matrix_inputs_are_left_to_the_caller():
    a, u = _pair(3)
    bad = a.clone()
    bad[0, 0] = float("nan")
    jobs = [_job(0, bad, u), _job(1, a[0], u[0]), _job(2, a, u[:-1])]
    session = ReadAhead(None, jobs, workers=2)
    try:
        assert session.take("w0", bad, u, PARAMS) is None
        assert session.take("w1", a[0], u[0], PARAMS) is None
        assert session.take("w2", a, u[:-1], PARAMS) is None
        assert all(job.aligned.calls == 1 for job in jobs)  # the workers did try
    finally:
        session.close()


def test_a_failing_worker_leaves_the_tensor_to_the_caller(monkeypatch):
    a, u = _pair(4)

    def failing(*args, **kwargs):
        raise RuntimeError("LAPACK dsytrd failed with info=3")

    monkeypatch.setattr(read_ahead, "safety_factors", failing)
    session = ReadAhead(None, [_job(0, a, u)], workers=1)
    try:
        assert session.take("w0", a, u, PARAMS) is None
    finally:
        session.close()


def _workers_alive():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("lssf-read-ahead-")]


def test_close_waits_for_a_worker_inside_a_spectrum(monkeypatch):
    """A worker left running a spectrum when the interpreter exits aborts the process
    (seen once in CI: exit -6, "terminate called without an active exception", after
    the merge was written); close() returns only when every worker has stopped."""
    import threading
    import time

    a, u = _pair(6)
    started, real = threading.Event(), read_ahead.safety_factors

    def slow(*args, **kwargs):
        started.set()
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(read_ahead, "safety_factors", slow)
    jobs = [_job(0, a, u), _job(1, a, u), _job(2, a, u)]
    session = ReadAhead(None, jobs, workers=1)
    assert started.wait(10)
    begin = time.perf_counter()
    session.close()
    assert time.perf_counter() - begin > 0.1  # it waited for the running spectrum
    assert not any(t.is_alive() for t in session.threads) and _workers_alive() == []
    assert jobs[0].result is None  # finished after close: not kept
    assert [job.state for job in jobs[1:]] == ["pending", "pending"]  # and nothing new started


def test_the_running_executor_is_found_from_inside_a_task():
    from mergekit.graph import Executor, Task

    class Probe(Task[int]):
        label: str

        def arguments(self):
            return {}

        def execute(self):
            found = read_ahead._running_executor()
            assert found is not None
            executor, index = found
            assert executor.schedule.tasks[index].task() is self or executor.schedule.tasks[index].task() == self
            return index

    assert read_ahead._running_executor() is None
    tasks = [Probe(label=x) for x in ("a", "b", "c")]
    results = dict(Executor(tasks).run(quiet=True))
    assert sorted(results.values()) == [0, 1, 2]


@pytest.mark.parametrize("broken, max_gram", [(False, 2048), (True, 2048), (False, 63)])
def test_run_merge_stops_the_workers_and_restores_blas_threads(toy_dir, tmp_path, monkeypatch, broken, max_gram):
    """In one process, as a library user runs merges: after run_merge returns or
    raises, no session is left and SciPy's BLAS has its threads back. A model with
    a Gram matrix above MAX_GRAM (the toy's mlp weights are 160 x 64) is not read ahead."""
    import shutil

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    from helpers import write_lssf_recipe

    models = tmp_path / "models"
    shutil.copytree(toy_dir, models, ignore=shutil.ignore_patterns("*.yml"))
    if broken:  # a non-finite value in the last layer: the merge fails half way
        path = models / "aligned" / "model.safetensors"
        state = load_file(path)
        state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(state, path)
    monkeypatch.setenv(ENV_VAR, "2")
    monkeypatch.setattr(read_ahead, "MAX_GRAM", max_gram)
    with open(models / write_lssf_recipe(models, "r.yml", {"alpha": 1.0}, base=str(models / "finetuned"))) as fp:
        doc = yaml.safe_load(fp)
    for entry in doc["models"]:  # absolute: mergekit caches loaders by model path per process
        entry["model"] = str(models / entry["model"])
    config = MergeConfiguration.model_validate(doc)
    before = _limits()
    if broken:
        with pytest.raises(LSSFConfigError, match="model.layers.1.mlp.down_proj.weight of the aligned"):
            run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
    else:
        run_merge(config, str(tmp_path / "out"), options=MergeOptions(quiet=True))
        from mergekit_lssf.stats import STATS

        ahead = sum(r.read_ahead for r in STATS.records)
        assert ahead == (13 if max_gram >= 64 else 0)  # all fused tensors but the first, or none
        assert len(STATS.records) == 14
    assert read_ahead.SCOPE.session is None and read_ahead.SCOPE.workers == 0
    assert _workers_alive() == []
    assert _limits() == before
