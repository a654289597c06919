"""Model work beside serving (Engine.run_exclusive) runs on the engine's thread between steps, never beside a
forward; it is counted in the engine's stats, its failure is its own, and it fails with EngineStopped once the
engine stops."""
from __future__ import annotations

import threading

import pytest

from basemodel.convert import artifact_from_files
from prefix_store.peft_io import read_dir
from server.engine.engine import Engine
from server.engine.request import EngineStopped
from server.engine.sampling import SamplingParams
from tests.engine.conftest import make_peft_adapter
from tests.engine.test_exactness import PROMPTS, run_alone


def test_jobs_run_on_the_engine_thread_between_forwards(loaded):
    alone = run_alone(Engine(loaded), PROMPTS[0], None, 24)
    engine = Engine(loaded)
    forward, in_forward, seen = engine.runner.forward, threading.Event(), []

    def watched_forward(*args, **kwargs):
        in_forward.set()
        try:
            return forward(*args, **kwargs)
        finally:
            in_forward.clear()

    def job() -> int:
        seen.append((threading.current_thread().name, in_forward.is_set()))
        return 42

    engine.runner.forward = watched_forward
    engine.start()
    try:
        h = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True), loop=None)
        futures = [engine.run_exclusive(job) for _ in range(3)]
        assert [f.result(60) for f in futures] == [42] * 3
        failing = engine.run_exclusive(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(60)  # the job's own failure: the engine and its request go on
        assert h.wait(60).token_ids == alone  # model jobs between its steps change none of its tokens
        assert seen == [("prefixserve-engine", False)] * 3
        assert engine.stats.jobs == 4 and engine.stats.job_seconds > 0
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.run_exclusive(job)


def test_jobs_not_run_fail_when_the_engine_stops(loaded):
    engine = Engine(loaded)  # never started: nothing runs the job
    queued = engine.run_exclusive(lambda: 1)
    engine.stop()
    assert isinstance(queued.exception(5), EngineStopped) and engine.stats.jobs == 0


def test_prompt_tuning_conversion_is_the_upload_s_model_work(kind, loaded, tmp_path):
    """artifact_from_files hands the model work to its caller's `run_model` (the server's is run_exclusive): one
    job for a prompt-tuning adapter, none for prefix tuning, which needs no model."""
    jobs = []

    def run_model(work):
        jobs.append(work)
        return work()

    prompt = read_dir(make_peft_adapter(kind, "prompt", 4, tmp_path / "p", seed=1))
    prefix = read_dir(make_peft_adapter(kind, "prefix", 4, tmp_path / "x", seed=1))
    converted = artifact_from_files(prompt, loaded, run_model=run_model)
    assert len(jobs) == 1 and converted.manifest.source == "peft:prompt_tuning"
    assert artifact_from_files(prompt, loaded).manifest.sha256 == converted.manifest.sha256  # same KV in place
    artifact_from_files(prefix, loaded, run_model=run_model)
    assert len(jobs) == 1
