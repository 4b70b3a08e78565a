"""The workflows run distributed, unchanged: services/orchestrator/workflows.py against gRPC clients of the
three real servers (tensors between them in the local S3 server), compared with the same workflows
in-process (tests/conftest.py's `clients`) on the same tiny checkpoint and seeds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch

from services.common.images import vae_resize
from services.common.protos import common_pb2, llm_pb2
from services.common.contracts import Cancelled, ImageParams, InputError, messages, TextItem, TextParams, VAEImageItem
from services.llm.server import LLM_SERVICE
from services.orchestrator import workflows as wf
from services.orchestrator.remote import RemoteViTImageItem, remote_clients
from service_helpers import llm_kv_blocks_left, noise_image


@pytest.fixture(scope="module")
def remote(vit_server, vae_server, llm_server, store, tiny_ckpt):
    c = remote_clients(vit_server.address, vae_server.address, f"127.0.0.1:{llm_server.port}", store=store,
                       timeout=120, job_id="job-distributed", cfg=tiny_ckpt.config)
    yield c
    c.close()


def picture():
    return noise_image(24, 24, seed=9)  # the VAE resize makes it 512x512


def test_text_to_image_distributed_equals_in_process(remote, clients, store):
    params = ImageParams(width=64, height=48, num_timesteps=4, seed=21)
    got = wf.generate(remote, "a red boat on a lake", params)
    want = wf.generate(clients, "a red boat on a lake", params)
    assert got.seed == want.seed == 21
    assert torch.equal(got.latent.fetch(), want.latent)
    assert got.pixels.dtype == np.uint8 and np.array_equal(got.pixels, want.pixels)
    stored = [k for k in _keys(store, "jobs/job-distributed/latents/")]
    assert any(torch.equal(store.get_tensor(k), want.latent) for k in stored)  # the LLM kept it under the job


def test_edit_distributed_equals_in_process(remote, clients, monkeypatch):
    from services.orchestrator import remote as remote_module

    encoded = []
    real_png = remote_module.png
    monkeypatch.setattr(remote_module, "png", lambda im: encoded.append(im.size) or real_png(im))
    image = picture()
    params = wf.edit_params(image, num_timesteps=3, seed=4)
    got = wf.edit(remote, image, "make it blue", params)
    want = wf.edit(clients, image, "make it blue", params)
    assert got.latent.fetch().shape == (16, 64, 64) and got.pixels.shape == (512, 512, 3)
    assert torch.equal(got.latent.fetch(), want.latent) and np.array_equal(got.pixels, want.pixels)
    assert encoded == [(512, 512)]  # the resized input went to the ViT and the VAE as one PNG encode


def test_understand_distributed_equals_in_process(remote, clients):
    for think in (False, True):
        p = TextParams(max_new_tokens=6)
        got = wf.understand(remote, picture(), "what is in the picture?", p, think=think)
        want = wf.understand(clients, picture(), "what is in the picture?", p, think=think)
        assert (got.text, got.think, got.tokens) == (want.text, want.think, want.tokens)


def test_features_travel_by_key_not_through_the_orchestrator(remote, clients):
    (item,) = remote.vit.encode([vae_resize(picture())])
    assert isinstance(item, RemoteViTImageItem) and item.message.ref.key.startswith("jobs/job-distributed/features/")
    assert not item.message.HasField("inline")
    got = remote.llm.understand([item, TextItem("describe it")], TextParams(max_new_tokens=4))
    assert item._features is None  # the LLM read the object itself; nothing was fetched here
    (local,) = clients.vit.encode([vae_resize(picture())])
    assert torch.equal(item.features, local.features)  # fetched on demand, equal to the in-process features
    assert got.text == clients.llm.understand([local, TextItem("describe it")], TextParams(max_new_tokens=4)).text


def test_progress_cancel_and_errors_reach_the_workflow(remote, llm_server, cancel_at_step):
    controls, steps = cancel_at_step(2)
    with pytest.raises(Cancelled):
        wf.generate(remote, "x", ImageParams(width=64, height=64, num_timesteps=500, seed=0), controls=controls)
    assert steps[:2] == [1, 2]
    with pytest.raises(InputError, match="width"):
        wf.generate(remote, "x", ImageParams(width=1000, height=64, num_timesteps=2))
    assert llm_kv_blocks_left(llm_server) == 0


def test_a_wrong_address_fails_with_unavailable(store):
    c = remote_clients("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1", store=store, timeout=2)
    try:
        with pytest.raises(grpc.RpcError) as info:
            wf.generate(c, "x", ImageParams(width=32, height=32, num_timesteps=2))
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        c.close()


def test_a_latent_sent_inline_is_sized_by_the_configs_downsample(tiny_ckpt):
    """A latent the orchestrator holds itself goes to the LLM inline, its image size from the config's VAE
    downsample (16 with five AE levels), not a constant 8."""
    cfg = replace(tiny_ckpt.config, ae=replace(tiny_ckpt.config.ae, ch_mult=(1, 1, 2, 2, 2)))
    assert cfg.ae.downsample == 16
    latent = torch.zeros(16, 3, 5)
    assert messages.latent_message(latent, down=cfg.ae.downsample).size == common_pb2.ImageSize(width=80, height=48)
    with pytest.raises(TypeError):
        messages.latent_message(latent)  # no default to fall back on

    seen = []

    def generate_text(request, context):
        seen.append(request)
        yield llm_pb2.GenerateTextEvent(done=llm_pb2.TextDone(text="ok"))

    handler = grpc.method_handlers_generic_handler(LLM_SERVICE, {"GenerateText": grpc.unary_stream_rpc_method_handler(
        generate_text, request_deserializer=llm_pb2.GenerateTextRequest.FromString,
        response_serializer=llm_pb2.GenerateTextEvent.SerializeToString)})
    server = grpc.server(ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    c = remote_clients("127.0.0.1:1", "127.0.0.1:1", f"127.0.0.1:{port}", timeout=10, cfg=cfg)
    try:
        assert c.llm.understand([VAEImageItem(latent), TextItem("what is this?")]).text == "ok"
    finally:
        c.close()
        server.stop(grace=0)
    (request,) = seen
    assert request.items[0].image.vae.size == common_pb2.ImageSize(width=80, height=48)


def _keys(store, prefix):
    return [o.object_name for o in store.client.list_objects(store.bucket, prefix=prefix, recursive=True)]
