"""Step-level batching: concurrent requests share forwards and get exactly their solo results."""

from __future__ import annotations

import threading

import pytest
import torch

from services.common.contracts import Cancelled, Controls, ImageParams, InputError, TextItem, TextParams
from services.llm.scheduler import Scheduler, SchedulerClosed


def test_concurrent_generations_share_forwards_and_match_solo_runs(engine):
    params = [ImageParams(width=32, height=32, num_timesteps=6, seed=s) for s in (1, 2)]
    prompts = ["a red car", "a green tree on a hill"]
    solo = [engine.generate_image([TextItem(p)], q).latent for p, q in zip(prompts, params)]
    batches = []
    sched = Scheduler(engine, on_batch=batches.append)
    try:
        # Hold the loop until both are queued so they overlap from the first step.
        gate = threading.Event()
        sched.submit(lambda: iter(gate.wait(5) and ()), Controls())
        futs = [sched.generate_image([TextItem(p)], q) for p, q in zip(prompts, params)]
        gate.set()
        got = [f.result(timeout=60).result.latent for f in futs]
    finally:
        sched.shutdown()
    assert max(batches) == 2  # the two requests' steps ran in the same forwards
    for a, b in zip(got, solo):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_decoding_requests_batch_together(engine):
    solo = [engine.understand([TextItem(p)], TextParams(max_new_tokens=5)).text for p in ("hi", "hello there")]
    batches = []
    sched = Scheduler(engine, on_batch=batches.append)
    try:
        gate = threading.Event()
        sched.submit(lambda: iter(gate.wait(5) and ()), Controls())
        futs = [sched.understand([TextItem(p)], TextParams(max_new_tokens=5)) for p in ("hi", "hello there")]
        gate.set()
        assert [f.result(timeout=60).result.text for f in futs] == solo
    finally:
        sched.shutdown()
    assert 2 in batches


def test_cancel_mid_generation_frees_blocks_and_others_continue(engine):
    sched = Scheduler(engine)
    controls = Controls()
    controls.on_progress = lambda p: controls.cancel.set() if p.step == 2 else None
    try:
        doomed = sched.generate_image([TextItem("x")], ImageParams(width=32, height=32, num_timesteps=50, seed=0),
                                      controls=controls)
        fine = sched.generate_image([TextItem("y")], ImageParams(width=32, height=32, num_timesteps=4, seed=0))
        with pytest.raises(Cancelled):
            doomed.result(timeout=60)
        assert fine.result(timeout=60).result.latent.shape == (16, 4, 4)
    finally:
        sched.shutdown()
    assert engine.cache.blocks_in_use == 0


def test_bad_request_fails_alone(engine):
    sched = Scheduler(engine)
    try:
        bad = sched.generate_image([TextItem("x")], ImageParams(width=30, height=32))
        with pytest.raises(InputError, match="width"):
            bad.result(timeout=30)
        assert sched.understand([TextItem("ok")], TextParams(max_new_tokens=2)).result(timeout=30).result.tokens == 2
    finally:
        sched.shutdown()
    with pytest.raises(SchedulerClosed):
        sched.understand([TextItem("late")])


def test_shutdown_cancels_in_flight_work(engine):
    sched = Scheduler(engine)
    started = threading.Event()
    controls = Controls(on_progress=lambda p: started.set())
    fut = sched.generate_image([TextItem("slow")], ImageParams(width=32, height=32, num_timesteps=1000, seed=0),
                               controls=controls)
    assert started.wait(30)
    sched.shutdown(cancel=True, timeout=30)
    with pytest.raises(Cancelled):
        fut.result(timeout=1)
    assert engine.cache.blocks_in_use == 0
