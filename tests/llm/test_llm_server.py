"""The LLM server for real: a server on a free port with the local S3 server, the generated stubs as the
client, and the in-process engine (tests/conftest.py's `llm`, same tiny checkpoint) as the reference."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.protos import common_pb2, llm_pb2, llm_pb2_grpc
from services.common.rpc import ServerOptions
from services.common.tensor_codec import tensor_from_message, tensor_to_message
from services.common.contracts import ImageParams, Progress, TextItem, TextParams, VAEImageItem, ViTImageItem
from services.dev.ports import free_port
from services.llm import convert, server as llm_server_module
from service_helpers import expect_status, metric_value, scrape

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
CODE = grpc.StatusCode
KV_TOKENS = 16384  # the server's cache, and so its longest context


class Started:
    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = llm_pb2_grpc.LLMServiceStub(self.channel)

    def metrics(self) -> str:
        return scrape(self.server.metrics_port)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0, drain_seconds=0)


def start_llm(ckpt, store=None, load=True, kv_cache_tokens=KV_TOKENS, build=None, **options) -> Started:
    opts = ServerOptions(**{**dict(host="127.0.0.1", port=0, drain_seconds=0.0, grace_seconds=2.0,
                                   metrics_port=free_port()), **options})
    server = llm_server_module.build_server(opts, ckpt.config, store, **(build or {}))
    server.start()
    if load:
        server.load(lambda: llm_server_module.load_engine(ckpt, kv_cache_tokens=kv_cache_tokens))
    return Started(server)


@pytest.fixture(scope="module")
def srv(tiny_ckpt, store):
    s = start_llm(tiny_ckpt, store)
    yield s
    s.close()


@pytest.fixture(scope="module")
def stub(srv):
    return srv.stub


# ---- helpers -------------------------------------------------------------------------------------
def vit_item(seed: int, grid=(2, 2)) -> ViTImageItem:
    g = torch.Generator().manual_seed(seed)
    return ViTImageItem(torch.randn(grid[0] * grid[1], 48, generator=g), grid)


def latent(seed: int, side: int = 4) -> torch.Tensor:
    return torch.randn(16, side, side, generator=torch.Generator().manual_seed(seed))  # a 32x32 image's latent


def text(t: str) -> llm_pb2.ContextItem:
    return llm_pb2.ContextItem(text=t)


def image_request(prompt="a red car", steps=4, size=32, seed=1, **kw) -> llm_pb2.GenerateImageRequest:
    return llm_pb2.GenerateImageRequest(items=[text(prompt)], params=llm_pb2.ImageParams(
        width=size, height=size, num_timesteps=steps, seed=seed), **kw)


def last(events):
    events = list(events)
    return events, events[-1]


def kv_in_use(s: Started) -> float:
    return metric_value(s.metrics(), "bagel_llm_kv_blocks_in_use")


def batched_iterations(metrics: str) -> float:
    """Scheduler iterations that ran more than one request."""
    return (metric_value(metrics, "bagel_llm_batch_requests_count")
            - metric_value(metrics, "bagel_llm_batch_requests_bucket", le="1.0"))


def wait_for(predicate, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


# ---- GenerateText --------------------------------------------------------------------------------
def test_generate_text_streams_deltas_then_the_engines_answer(stub, store, llm):
    vit = vit_item(0)
    store.put_tensor("uploads/tests/llm/features-0.safetensors", vit.features)
    features = common_pb2.ViTFeatures(ref=common_pb2.TensorRef(key="uploads/tests/llm/features-0.safetensors"),
                                      grid=common_pb2.PatchGrid(rows=2, cols=2))
    req = llm_pb2.GenerateTextRequest(items=[llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=features)),
                                             text("what is in the picture?")],
                                      params=llm_pb2.TextParams(max_new_tokens=8))
    events, end = last(stub.GenerateText(req, timeout=30))
    expected = llm.understand([vit, TextItem("what is in the picture?")], TextParams(max_new_tokens=8))
    deltas = [e.delta for e in events[:-1]]
    assert deltas and all(e.HasField("delta") for e in events[:-1]) and end.HasField("done")
    assert {d.stage for d in deltas} == {llm_pb2.TEXT_STAGE_ANSWER} and {d.max_tokens for d in deltas} == {8}
    assert [d.tokens for d in deltas] == sorted(d.tokens for d in deltas)
    assert "".join(d.text for d in deltas) == end.done.text == expected.text
    assert end.done.tokens == expected.tokens and end.done.think == "" and end.done.session_id == ""


def test_think_mode_streams_think_text_and_matches_the_engine(stub, llm):
    req = llm_pb2.GenerateTextRequest(items=[text("why is the sky blue?")], think=True,
                                      params=llm_pb2.TextParams(max_new_tokens=6))
    events, end = last(stub.GenerateText(req, timeout=30))
    expected = llm.understand([TextItem("why is the sky blue?")], TextParams(max_new_tokens=6), think=True)
    # random weights never write </think>: everything streams as THINK, and the engine calls it the answer
    assert {e.delta.stage for e in events[:-1]} == {llm_pb2.TEXT_STAGE_THINK}
    assert (end.done.text, end.done.think or None, end.done.tokens) == (expected.text, expected.think,
                                                                        expected.tokens)


def test_text_deltas_split_at_think_end_and_hold_back_unfinished_text():
    d = convert.TextDeltas(convert.ANSWER, split_think=True)
    got = []
    for step, so_far in enumerate(["<think>a", "<think>ab</", "<think>ab</think>", "<think>ab</think> x\ufffd",
                                   "<think>ab</think> xy"], start=1):
        got += [(x.stage, x.text, x.tokens, x.max_tokens) for x in d.update(Progress("think", step, 10, so_far))]
    got += [(x.stage, x.text) for x in d.finish()]
    think, answer = convert.THINK, convert.ANSWER
    assert got == [(think, "<think>a", 1, 10), (think, "b", 2, 10), (answer, " x", 1, 7), (answer, "y", 2, 7)]


# ---- GenerateImage -------------------------------------------------------------------------------
def test_text_to_image_streams_progress_and_stores_the_engines_latent(stub, store, llm):
    req = image_request("a red car", steps=5, seed=11, job_id="job-llm-1")
    events, end = last(stub.GenerateImage(req, timeout=60))
    assert [(e.progress.step, e.progress.total) for e in events[:-1]] == [(i, 4) for i in range(1, 5)]
    done = end.done
    assert done.seed == 11 and (done.latent.size.width, done.latent.size.height) == (32, 32)
    assert done.latent.ref.key.startswith("jobs/job-llm-1/latents/") and not done.latent.HasField("inline")
    expected = llm.generate_image([TextItem("a red car")], ImageParams(width=32, height=32, num_timesteps=5, seed=11))
    assert torch.equal(store.get_tensor(done.latent.ref.key), expected.latent)
    # a retry of the same request in the same job writes the same object again
    assert last(stub.GenerateImage(req, timeout=60))[1].done.latent.ref.key == done.latent.ref.key


def test_edit_with_a_vae_and_vit_image_takes_edit_defaults(stub, store, llm):
    lat, vit = latent(3), vit_item(4)
    store.put_tensor("uploads/tests/llm/latent-3.safetensors", lat)
    image = llm_pb2.ImageItem(vae=common_pb2.Latent(ref=common_pb2.TensorRef(key="uploads/tests/llm/latent-3.safetensors")),
                              vit=common_pb2.ViTFeatures(inline=tensor_to_message(vit.features),
                                                         grid=common_pb2.PatchGrid(rows=2, cols=2)))
    # no preset, no size: a latent in the context means EDIT defaults at the input's size (32x32)
    req = llm_pb2.GenerateImageRequest(items=[llm_pb2.ContextItem(image=image), text("make it blue")],
                                       params=llm_pb2.ImageParams(num_timesteps=4, seed=5),
                                       delivery=common_pb2.DELIVERY_INLINE)
    events, end = last(stub.GenerateImage(req, timeout=60))
    assert len(events) == 4 and not end.done.latent.HasField("ref")
    expected = llm.generate_image([VAEImageItem(lat), vit, TextItem("make it blue")],
                                  ImageParams.for_edit(32, 32, num_timesteps=4, seed=5))
    assert torch.equal(tensor_from_message(end.done.latent.inline), expected.latent)


def test_think_then_generate_streams_the_plan_first(stub, llm):
    req = image_request("a cat", steps=3, seed=2, think=True, think_params=llm_pb2.TextParams(max_new_tokens=4),
                        delivery=common_pb2.DELIVERY_BOTH)
    events, end = last(stub.GenerateImage(req, timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "think" and kinds[-3:] == ["progress", "progress", "done"] and set(kinds) == {
        "think", "progress", "done"}
    assert {e.think.stage for e in events if e.HasField("think")} == {llm_pb2.TEXT_STAGE_THINK}
    expected = llm.generate_image([TextItem("a cat")], ImageParams(width=32, height=32, num_timesteps=3, seed=2),
                                  think=True, think_params=TextParams(max_new_tokens=4))
    assert end.done.think == expected.think == "".join(e.think.text for e in events if e.HasField("think"))
    assert torch.equal(tensor_from_message(end.done.latent.inline), expected.latent)


def test_unset_seed_is_drawn_and_echoed(stub):
    req = llm_pb2.GenerateImageRequest(items=[text("x")], delivery=common_pb2.DELIVERY_INLINE,
                                       params=llm_pb2.ImageParams(width=32, height=32, num_timesteps=3))
    first = last(stub.GenerateImage(req, timeout=30))[1].done
    req.params.seed = first.seed
    again = last(stub.GenerateImage(req, timeout=30))[1].done
    assert first.seed != 0 and torch.equal(tensor_from_message(again.latent.inline),
                                           tensor_from_message(first.latent.inline))


# ---- batching, cancellation, deadlines ---------------------------------------------------------------
def test_concurrent_generations_share_forwards(srv, llm):
    before = batched_iterations(srv.metrics())
    long_req = image_request("a red car", steps=150, seed=1, delivery=common_pb2.DELIVERY_INLINE)
    short_req = image_request("a green tree on a hill", steps=12, seed=2, delivery=common_pb2.DELIVERY_INLINE)
    call = srv.stub.GenerateImage(long_req, timeout=120)
    first = next(call)  # the long one runs: the short one joins its forwards
    _, short_end = last(srv.stub.GenerateImage(short_req, timeout=60))
    _, long_end = last([first, *call])
    assert batched_iterations(srv.metrics()) - before >= 11  # every step of the short one was shared
    for end, prompt, steps, seed in ((long_end, "a red car", 150, 1), (short_end, "a green tree on a hill", 12, 2)):
        solo = llm.generate_image([TextItem(prompt)], ImageParams(width=32, height=32, num_timesteps=steps, seed=seed))
        torch.testing.assert_close(tensor_from_message(end.done.latent.inline), solo.latent, atol=1e-5, rtol=1e-5)


def test_client_cancel_mid_generation_frees_the_kv_blocks(srv):
    call = srv.stub.GenerateImage(image_request(steps=1000, size=64), timeout=120)
    assert next(call).HasField("progress")
    assert kv_in_use(srv) > 0
    call.cancel()
    wait_for(lambda: kv_in_use(srv) == 0 and metric_value(srv.metrics(), "bagel_llm_active_requests") == 0,
             what="the cancelled request's KV blocks")
    wait_for(lambda: metric_value(srv.metrics(), "bagel_rpc_requests_total", method="GenerateImage",
                                  code="CANCELLED") >= 1, what="the CANCELLED count")


def test_deadline_stops_the_generation(srv):
    expect_status(CODE.DEADLINE_EXCEEDED, lambda: list(srv.stub.GenerateImage(image_request(steps=1000, size=64),
                                                                              timeout=0.5)))
    wait_for(lambda: kv_in_use(srv) == 0, what="the expired request's KV blocks")
    assert metric_value(srv.metrics(), "bagel_rpc_requests_total", method="GenerateImage",
                        code="DEADLINE_EXCEEDED") >= 1  # the server's own count says why it ended


def test_metrics_count_steps_tokens_and_kv_capacity(srv, stub):
    before = srv.metrics()
    last(stub.GenerateImage(image_request(steps=4, delivery=common_pb2.DELIVERY_INLINE), timeout=30))
    after = srv.metrics()
    assert (metric_value(after, "bagel_llm_denoise_steps_total")
            - metric_value(before, "bagel_llm_denoise_steps_total")) == 3
    assert metric_value(after, "bagel_llm_kv_blocks_total") == KV_TOKENS // 16
    assert metric_value(after, "bagel_rpc_requests_total", method="GenerateImage", code="OK") >= 1
    assert metric_value(after, "bagel_llm_decoded_tokens_total") > 0  # the text tests ran before
    assert "bagel_engine_queue_depth 0.0" in after


# ---- sessions ------------------------------------------------------------------------------------
def test_session_turns_equal_replaying_the_history(stub, llm):
    vit, session = vit_item(7), llm_pb2.SessionOptions(id="chat-1", ttl_seconds=60)
    p = llm_pb2.TextParams(max_new_tokens=4)
    image = llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=common_pb2.ViTFeatures(
        inline=tensor_to_message(vit.features), grid=common_pb2.PatchGrid(rows=2, cols=2))))
    first = last(stub.GenerateText(llm_pb2.GenerateTextRequest(items=[image, text("what is this?")], params=p,
                                                               session=session), timeout=30))[1].done
    second = last(stub.GenerateText(llm_pb2.GenerateTextRequest(items=[text("and the colour?")], params=p,
                                                                session=session), timeout=30))[1].done
    assert first.session_id == second.session_id == "chat-1"
    tok = llm.tok
    history = [vit, TextItem("what is this?"), TextItem(tok.decode(tok.encode(first.text))),
               TextItem("and the colour?")]
    assert second.text == llm.understand(history, TextParams(max_new_tokens=4)).text
    # an image in the session sees the whole conversation (its three CFG contexts included)
    req = image_request("draw it", steps=3, seed=1, session=session, delivery=common_pb2.DELIVERY_INLINE)
    req.params.cfg_img_scale = 2.0
    in_session = tensor_from_message(last(stub.GenerateImage(req, timeout=30))[1].done.latent.inline)
    replay = llm.generate_image(history + [TextItem(second.text), TextItem("draw it")],
                                ImageParams(width=32, height=32, num_timesteps=3, seed=1, cfg_img_scale=2.0)).latent
    torch.testing.assert_close(in_session, replay, atol=1e-5, rtol=1e-5)
    assert stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id="chat-1")).deleted
    assert not stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id="chat-1")).deleted  # as the proto says


def test_a_busy_session_refuses_a_second_turn_with_aborted(srv):
    session = llm_pb2.SessionOptions(id="busy-1")
    call = srv.stub.GenerateImage(image_request(steps=1000, size=64, session=session), timeout=120)
    assert next(call).HasField("progress")
    expect_status(CODE.ABORTED, lambda: list(srv.stub.GenerateText(llm_pb2.GenerateTextRequest(
        items=[text("hi")], session=session), timeout=10)), match="serving another request")
    call.cancel()
    assert srv.stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id="busy-1")).deleted
    wait_for(lambda: kv_in_use(srv) == 0, what="the session's KV blocks")


# ---- bad input -----------------------------------------------------------------------------------
def _vit_msg(**kw):
    return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=common_pb2.ViTFeatures(**kw)))


BAD_IMAGE_REQUESTS = {
    "width 1000": (image_request(size=32), dict(width=1000), CODE.INVALID_ARGUMENT, "width"),
    "zero steps": (image_request(), dict(num_timesteps=0), CODE.INVALID_ARGUMENT, "num_timesteps"),
    "one step": (image_request(), dict(num_timesteps=1), CODE.INVALID_ARGUMENT, "num_timesteps"),
    "bad interval": (image_request(), dict(cfg_interval_lo=0.9, cfg_interval_hi=0.1), CODE.INVALID_ARGUMENT,
                     "cfg_interval"),
    "noise shape": (image_request(), dict(noise=common_pb2.TensorSource(inline=tensor_to_message(torch.zeros(3, 64)))),
                    CODE.INVALID_ARGUMENT, "noise"),
    "inf noise": (image_request(), dict(noise=common_pb2.TensorSource(inline=tensor_to_message(
        torch.full((4, 64), float("inf"))))), CODE.INVALID_ARGUMENT, "params.noise: values must be finite"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_REQUESTS))
def test_bad_image_params_are_invalid_argument(stub, name):
    req, fields, code, match = BAD_IMAGE_REQUESTS[name]
    req = llm_pb2.GenerateImageRequest.FromString(req.SerializeToString())
    for key, value in fields.items():
        if isinstance(value, common_pb2.TensorSource):
            getattr(req.params, key).CopyFrom(value)
        else:
            setattr(req.params, key, value)
    expect_status(code, lambda: list(stub.GenerateImage(req, timeout=10)), match=match)


BAD_ITEMS = {
    "no items": ([], CODE.INVALID_ARGUMENT, "at least one"),
    "empty image": ([llm_pb2.ContextItem(image=llm_pb2.ImageItem())], CODE.INVALID_ARGUMENT, "set `vit`"),
    "missing object": ([_vit_msg(ref=common_pb2.TensorRef(key="jobs/none/features/missing.safetensors"),
                                 grid=common_pb2.PatchGrid(rows=2, cols=2))], CODE.NOT_FOUND, "not found"),
    "other bucket": ([_vit_msg(ref=common_pb2.TensorRef(bucket="elsewhere", key="uploads/a.safetensors"),
                               grid=common_pb2.PatchGrid(rows=2, cols=2))], CODE.PERMISSION_DENIED, "elsewhere"),
    "grid mismatch": ([_vit_msg(inline=tensor_to_message(torch.zeros(4, 48)),
                                grid=common_pb2.PatchGrid(rows=3, cols=2))], CODE.INVALID_ARGUMENT, "patch grid"),
    "features width": ([_vit_msg(inline=tensor_to_message(torch.zeros(4, 40)),
                                 grid=common_pb2.PatchGrid(rows=2, cols=2))], CODE.INVALID_ARGUMENT, "shape must be"),
    "integer latent": ([llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=common_pb2.Latent(
        inline=tensor_to_message(torch.zeros(16, 4, 4, dtype=torch.int32)))))], CODE.INVALID_ARGUMENT, "dtype"),
    "latent channels": ([llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=common_pb2.Latent(
        inline=tensor_to_message(torch.zeros(8, 4, 4)))))], CODE.INVALID_ARGUMENT, "shape must be"),
    "nan latent": ([llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=common_pb2.Latent(
        inline=tensor_to_message(torch.full((16, 4, 4), float("nan"))))))], CODE.INVALID_ARGUMENT, "finite"),
    "inf features": ([_vit_msg(inline=tensor_to_message(torch.full((4, 48), float("-inf"))),
                               grid=common_pb2.PatchGrid(rows=2, cols=2))], CODE.INVALID_ARGUMENT, "finite"),
    "raw bytes short": ([_vit_msg(inline=common_pb2.Tensor(shape=[4, 48], dtype=common_pb2.DTYPE_FLOAT32, data=b"x"),
                                  grid=common_pb2.PatchGrid(rows=2, cols=2))], CODE.INVALID_ARGUMENT, "bytes"),
}


@pytest.mark.parametrize("name", sorted(BAD_ITEMS))
def test_bad_context_items_get_their_status(stub, name):
    items, code, match = BAD_ITEMS[name]
    expect_status(code, lambda: list(stub.GenerateText(llm_pb2.GenerateTextRequest(items=items), timeout=10)),
                  match=match)


def test_bad_text_requests(stub):
    def call(**kw):
        return list(stub.GenerateText(llm_pb2.GenerateTextRequest(**kw), timeout=30))

    expect_status(CODE.INVALID_ARGUMENT, call, items=[text("hi")], params=llm_pb2.TextParams(max_new_tokens=0),
                  match="max_new_tokens")
    expect_status(CODE.INVALID_ARGUMENT, call, items=[text("hi")],
                  params=llm_pb2.TextParams(do_sample=True, temperature=0.0), match="temperature")
    expect_status(CODE.INVALID_ARGUMENT, call, items=[text("hello " * (KV_TOKENS + 100))], match="context tokens")
    expect_status(CODE.INVALID_ARGUMENT, call, items=[text("hi")], session=llm_pb2.SessionOptions(id="x" * 300),
                  match="session id")
    expect_status(CODE.INVALID_ARGUMENT, call, items=[text("hi")],
                  session=llm_pb2.SessionOptions(id="s", ttl_seconds=10 ** 6), match="ttl_seconds")
    expect_status(CODE.INVALID_ARGUMENT, stub.DeleteSession, llm_pb2.DeleteSessionRequest(session_id=""))
    expect_status(CODE.INVALID_ARGUMENT, lambda: list(stub.GenerateImage(image_request(output_key="../x"),
                                                                         timeout=10)), match="object key")
    outside = image_request(output_key="jobs/someone-else/latents/x.safetensors", job_id="mine")
    expect_status(CODE.INVALID_ARGUMENT, lambda: list(stub.GenerateImage(outside, timeout=10)), match="job prefix")


@pytest.mark.servers  # starts its own LLM server
def test_session_limit_and_full_kv_cache_are_resource_exhausted(tiny_ckpt):
    # 16 blocks of 16 tokens and one session: a kept conversation leaves too little for a second prompt
    s = start_llm(tiny_ckpt, kv_cache_tokens=256, build=dict(max_sessions=1))
    try:
        def ask(prompt, session=""):
            return list(s.stub.GenerateText(llm_pb2.GenerateTextRequest(
                items=[text(prompt)], params=llm_pb2.TextParams(max_new_tokens=1),
                session=llm_pb2.SessionOptions(id=session)), timeout=30))

        ask("hello " * 150, session="a")
        expect_status(CODE.RESOURCE_EXHAUSTED, ask, "hi", session="b", match="sessions")
        expect_status(CODE.RESOURCE_EXHAUSTED, ask, "hello " * 120, match="KV cache full")
        assert s.stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id="a")).deleted
        assert len(ask("hello " * 120)) >= 1  # room again
        assert kv_in_use(s) == 0
    finally:
        s.close()


@pytest.mark.servers  # starts its own LLM servers
def test_a_later_turn_of_a_session_lost_in_a_restart_is_refused(tiny_ckpt):
    def ask(s, prompt, resume):
        return list(s.stub.GenerateText(llm_pb2.GenerateTextRequest(
            items=[text(prompt)], params=llm_pb2.TextParams(max_new_tokens=2),
            session=llm_pb2.SessionOptions(id="chat-r", resume=resume)), timeout=30))

    s = start_llm(tiny_ckpt)
    try:
        expect_status(CODE.FAILED_PRECONDITION, ask, s, "hi", True, match="is gone")  # nothing to continue
        assert ask(s, "hello", False)[-1].done.session_id == "chat-r"  # the first turn creates it
        assert ask(s, "and then?", True)[-1].done.session_id == "chat-r"
    finally:
        s.close()
    s = start_llm(tiny_ckpt)  # the same checkpoint, restarted: its sessions are gone
    try:
        expect_status(CODE.FAILED_PRECONDITION, ask, s, "and then?", True, match="lost when the LLM server restarted")
        assert not s.stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id="chat-r")).deleted  # not recreated
        assert kv_in_use(s) == 0
    finally:
        s.close()


@pytest.mark.servers  # starts its own LLM server
def test_wrong_token_is_unauthenticated(tiny_ckpt):
    s = start_llm(tiny_ckpt, load=False, auth_token="right-token")
    try:
        req = llm_pb2.GenerateTextRequest(items=[text("hi")])
        expect_status(CODE.UNAUTHENTICATED, lambda: list(s.stub.GenerateText(
            req, metadata=[("authorization", "Bearer wrong-token")], timeout=5)))
        expect_status(CODE.UNAUTHENTICATED, s.stub.DeleteSession, llm_pb2.DeleteSessionRequest(session_id="a"))
        # the right token gets through to a server still loading its weights
        expect_status(CODE.UNAVAILABLE, lambda: list(s.stub.GenerateText(
            req, metadata=[("authorization", "Bearer right-token")], timeout=5)), match="still loading")
    finally:
        s.close()


# ---- lifecycle -----------------------------------------------------------------------------------
@pytest.mark.servers  # starts its own LLM server
def test_health_follows_the_weights_and_shutdown_cancels_in_flight_work(tiny_ckpt):
    s = start_llm(tiny_ckpt, load=False, grace_seconds=0.3)
    try:
        assert health(s.channel) == health(s.channel, "bagel.v1.LLMService") == NOT_SERVING
        s.server.load(lambda: llm_server_module.load_engine(tiny_ckpt, kv_cache_tokens=4096))
        assert health(s.channel, "bagel.v1.LLMService") == SERVING
        call = s.stub.GenerateImage(image_request(steps=1000, size=64), timeout=60)
        assert next(call).HasField("progress")
        engine = s.server.slot.peek()
        stopper = threading.Thread(target=s.server.stop)
        t0 = time.monotonic()
        stopper.start()
        with pytest.raises(grpc.RpcError):
            list(call)
        stopper.join(10)
        assert not stopper.is_alive() and time.monotonic() - t0 < 5
        assert engine.cache.blocks_in_use == 0 and s.server.runtime.scheduler.active == 0
        assert not s.server.runtime.scheduler._thread.is_alive()
    finally:
        s.close()


@pytest.mark.servers  # starts its own LLM server
def test_serve_plugs_the_llm_server_in(tiny_ckpt_dir, monkeypatch):
    """`bagel-serve serve llm` path: services.serve finds build_server/load_engine and serves; without
    storage the final latent comes back inline."""
    from services.serve import serve

    monkeypatch.delenv("BAGEL_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("BAGEL_KV_CACHE_TOKENS", "2048")
    server = serve("llm", port=0, checkpoint=tiny_ckpt_dir, host="127.0.0.1", block=False, handle_signals=False,
                   drain_seconds=0, grace_seconds=0.5)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert health(channel, "bagel.v1.LLMService") == SERVING
            assert server.slot.peek().cache.num_blocks == 2048 // 16
            _, end = last(llm_pb2_grpc.LLMServiceStub(channel).GenerateImage(image_request(steps=2), timeout=30))
            assert end.done.latent.HasField("inline") and not end.done.latent.HasField("ref")
    finally:
        server.stop()
