"""The server scaffold on a real ViT server: health, reflection, auth, limits, deadlines, metrics, logs,
TLS and graceful shutdown. A generic handler that blocks until released stands in for a long request."""

import json
import logging
import shutil
import subprocess
import threading
import time

import grpc
import pytest
import tritonclient.grpc as tc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tritonclient.utils import InferenceServerException

from services.common.protos import common_pb2, vit_pb2, vit_pb2_grpc
from services.common.rpc import State
from services.common.rpc.interceptors import client_message
from services.common.rpc.logs import JsonFormatter
from services.dev.ports import free_port
from services.vit import server as vit_server_module
from service_helpers import expect_status, metric_value, noise_image, png_bytes, scrape

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "bagel.v1.ViTService", "inference.GRPCInferenceService")
REQUEST = vit_pb2.ViTEncodeRequest(delivery=common_pb2.DELIVERY_INLINE, inputs=[
    vit_pb2.ViTEncodeInput(image=common_pb2.ImageRef(encoded=png_bytes(noise_image(20, 20))))] * 2)


class Gate:
    """A /test.Gate/Hold RPC that blocks until release is set."""

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def handler(self):
        def hold(request, context):
            self.entered.set()
            assert self.release.wait(20)
            return b"done"
        return grpc.method_handlers_generic_handler("test.Gate", {"Hold": grpc.unary_unary_rpc_method_handler(hold)})

    @staticmethod
    def call(channel):
        return channel.unary_unary("/test.Gate/Hold").future(b"x", timeout=30)


def health_status(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_load_and_drain(make_server, tiny_ckpt):
    s = make_server("vit", load=False)
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    triton = tc.InferenceServerClient(s.address)
    assert s.server.state is State.LOADING
    assert [health_status(s.channel, name) for name in SERVICES] == [NOT_SERVING] * 3
    expect_status(grpc.StatusCode.UNAVAILABLE, stub.Encode, REQUEST, match="still loading")
    assert triton.is_server_live() and not triton.is_server_ready() and not triton.is_model_ready("siglip_vit")

    s.server.load(lambda: vit_server_module.load_engine(tiny_ckpt))
    assert [health_status(s.channel, name) for name in SERVICES] == [SERVING] * 3
    assert triton.is_server_ready() and len(stub.Encode(REQUEST).features) == 2

    s.server.drain()
    assert [health_status(s.channel, name) for name in SERVICES] == [NOT_SERVING] * 3
    assert not triton.is_server_ready()
    assert len(stub.Encode(REQUEST).features) == 2  # still served while load balancers catch up
    s.server.stop(grace=1, drain_seconds=0)
    assert s.server.state is State.STOPPED
    expect_status(grpc.StatusCode.UNAVAILABLE, health_status, s.channel)
    triton.close()


def test_stop_drains_then_lets_in_flight_requests_finish(make_server):
    gate = Gate()
    s = make_server("vit", extra_handlers=[gate.handler()])
    in_flight = gate.call(s.channel)
    assert gate.entered.wait(5)
    stopper = threading.Thread(target=s.server.stop, kwargs=dict(grace=10, drain_seconds=0.5))
    stopper.start()
    deadline = time.monotonic() + 5
    while s.server.state is not State.DRAINING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health_status(s.channel) == NOT_SERVING  # drain: still answering, but out of rotation
    while time.monotonic() < deadline:  # then the server stops accepting new RPCs
        try:
            health_status(s.channel)
            time.sleep(0.05)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            break
    else:
        pytest.fail("the server kept accepting RPCs")
    assert stopper.is_alive() and not in_flight.done()  # waiting for the in-flight request
    gate.release.set()
    assert in_flight.result() == b"done"
    stopper.join(10)
    assert s.server.state is State.STOPPED


def test_reflection_lists_and_describes_the_services(vit_server):
    db = ProtoReflectionDescriptorDatabase(vit_server.channel)
    assert {"bagel.v1.ViTService", "inference.GRPCInferenceService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= set(db.get_services())
    encode = DescriptorPool(db).FindServiceByName("bagel.v1.ViTService").methods_by_name["Encode"]
    assert encode.input_type.full_name == "bagel.v1.ViTEncodeRequest"
    assert "features" in encode.output_type.fields_by_name


def test_bearer_token(make_server):
    s = make_server("vit", auth_token="s3cret")
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    expect_status(grpc.StatusCode.UNAUTHENTICATED, stub.Encode, REQUEST, match="missing")
    for value in ("Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2"):
        expect_status(grpc.StatusCode.UNAUTHENTICATED, stub.Encode, REQUEST, metadata=[("authorization", value)],
                      match="invalid")
    assert len(stub.Encode(REQUEST, metadata=[("authorization", "Bearer s3cret")]).features) == 2
    assert health_status(s.channel) == SERVING  # probes need no token
    triton = tc.InferenceServerClient(s.address)
    with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
        triton.is_server_ready()
    assert triton.is_server_ready(headers={"authorization": "Bearer s3cret"})
    triton.close()


def test_oversized_message_is_resource_exhausted(make_server):
    s = make_server("vit", max_message_mb=1)
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    big_image = common_pb2.ImageRef(encoded=b"\0" * 1_200_000)
    big = vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput(image=big_image)])
    expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Encode, big)
    assert len(stub.Encode(REQUEST).features) == 2


def test_garbage_request_bytes_are_invalid_argument(vit_server):
    # A raw channel sends bytes that do not parse as ViTEncodeRequest; gRPC alone would answer INTERNAL.
    raw = vit_server.channel.unary_unary("/bagel.v1.ViTService/Encode", request_serializer=None,
                                         response_deserializer=None)
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, raw, b"\xff\xff\xff", timeout=10,
                  match="not a valid message for /bagel.v1.ViTService/Encode")
    assert len(vit_pb2_grpc.ViTServiceStub(vit_server.channel).Encode(REQUEST).features) == 2


def test_client_messages_carry_no_heap_addresses():
    assert client_message("cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e50>") == \
        "cannot identify image file <_io.BytesIO object>"
    assert client_message("shape [1, 2] at 0 offset") == "shape [1, 2] at 0 offset"


def test_concurrency_limit_and_metrics(make_server):
    gate, port = Gate(), free_port()
    s = make_server("vit", max_concurrency=1, metrics_port=port, extra_handlers=[gate.handler()])
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    held = gate.call(s.channel)
    assert gate.entered.wait(5)
    assert metric_value(scrape(port), "bagel_rpc_in_flight", method="Hold") == 1
    expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Encode, REQUEST, match="limit of 1 concurrent")
    assert health_status(s.channel) == SERVING  # probes are never refused
    gate.release.set()
    assert held.result() == b"done"
    assert len(stub.Encode(REQUEST).features) == 2
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, vit_pb2.ViTEncodeRequest())

    text = scrape(port)
    enc = dict(service="bagel.v1.ViTService", method="Encode")
    assert metric_value(text, "bagel_rpc_requests_total", code="OK", **enc) == 1
    assert metric_value(text, "bagel_rpc_requests_total", code="RESOURCE_EXHAUSTED", **enc) == 1
    assert metric_value(text, "bagel_rpc_requests_total", code="INVALID_ARGUMENT", **enc) == 1
    assert metric_value(text, "bagel_rpc_requests_total", code="OK", service="test.Gate", method="Hold") == 1
    assert metric_value(text, "bagel_rpc_latency_seconds_count", code="OK", **enc) == 1
    assert metric_value(text, "bagel_batch_size_sum", method="ViTService.Encode") == 2
    assert metric_value(text, "bagel_rpc_in_flight", method="Hold") == 0
    assert metric_value(text, "bagel_model_ready") == 1


def test_deadline_is_honoured_while_waiting_for_the_model(make_server):
    port = free_port()
    s = make_server("vit", metrics_port=port)
    stub = vit_pb2_grpc.ViTServiceStub(s.channel)
    with s.server.slot.use():  # the model is busy with someone else's request
        expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, stub.Encode, REQUEST, timeout=0.5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the server gives up too, without waiting for the model
            text = scrape(port)
            if metric_value(text, "bagel_rpc_requests_total", code="DEADLINE_EXCEEDED", method="Encode") == 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server did not end the request at its deadline")
        assert metric_value(text, "bagel_engine_queue_depth") == 0


def test_request_id_in_metadata_and_json_logs(vit_server, caplog):
    stub = vit_pb2_grpc.ViTServiceStub(vit_server.channel)
    with caplog.at_level(logging.INFO, logger="bagel.rpc"):
        _, call = stub.Encode.with_call(REQUEST, metadata=[("x-request-id", "trace-7")])
    assert ("x-request-id", "trace-7") in [(m.key, m.value) for m in call.initial_metadata()]
    (record,) = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-7"]
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "trace-7" and line["rpc"] == "/bagel.v1.ViTService/Encode"
    assert line["code"] == "OK" and line["level"] == "info" and line["ms"] > 0
    _, call = stub.Encode.with_call(REQUEST)
    generated = dict(call.initial_metadata())["x-request-id"]
    assert len(generated) == 32 and generated != "trace-7"
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.Encode, REQUEST, metadata=[("x-request-id", "no spaces")],
                  match="x-request-id")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    s = make_server("vit", tls_cert=str(cert), tls_key=str(key))
    with grpc.secure_channel(s.address, grpc.ssl_channel_credentials(cert.read_bytes())) as secure:
        assert health_status(secure) == SERVING
        assert len(vit_pb2_grpc.ViTServiceStub(secure).Encode(REQUEST).features) == 2
    expect_status(grpc.StatusCode.UNAVAILABLE, health_status, s.channel)  # plaintext is refused


def test_streaming_rpcs_get_the_same_policies(make_server):
    """What the LLM server's streams rely on: errors mid-stream map to a status, cancels reach the handler."""
    from services.common.rpc.deadlines import cancel_event
    from services.common.contracts import InputError

    cancel_events: list[threading.Event] = []

    def fails_at_step_3(request, context):
        yield b"1"
        yield b"2"
        raise InputError("step 3 refused")

    def waits_for_cancel(request, context):
        cancel_events.append(cancel_event(context))
        yield b"started"
        cancel_events[0].wait(10)  # an engine loop would check it between steps

    port = free_port()
    handler = grpc.method_handlers_generic_handler("test.Stream", {
        "Fail": grpc.unary_stream_rpc_method_handler(fails_at_step_3),
        "Wait": grpc.unary_stream_rpc_method_handler(waits_for_cancel)})
    s = make_server("vit", metrics_port=port, extra_handlers=[handler])
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for item in s.channel.unary_stream("/test.Stream/Fail")(b"x", timeout=10):
            got.append(item)
    assert got == [b"1", b"2"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "step 3 refused"

    call = s.channel.unary_stream("/test.Stream/Wait")(b"x", timeout=10)
    assert next(call) == b"started"
    assert not cancel_events[0].is_set()
    call.cancel()
    assert cancel_events[0].wait(5)
    text = scrape(port)
    assert metric_value(text, "bagel_rpc_requests_total", method="Fail", code="INVALID_ARGUMENT") == 1


def test_a_streams_deadline_and_a_cancel_are_counted_apart(make_server):
    """gRPC stops reading a stream once it is over, for a deadline as for a cancel: the metrics tell which."""
    def ticks(request, context):
        for _ in range(500):
            time.sleep(0.02)
            yield b"tick"

    port = free_port()
    handler = grpc.method_handlers_generic_handler("test.Stream", {"Ticks": grpc.unary_stream_rpc_method_handler(ticks)})
    s = make_server("vit", metrics_port=port, extra_handlers=[handler])
    ticks_rpc = s.channel.unary_stream("/test.Stream/Ticks")

    def count(code):
        return metric_value(scrape(port), "bagel_rpc_requests_total", method="Ticks", code=code)

    def wait_for_count(code, n):
        deadline = time.monotonic() + 5
        while count(code) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count(code) == n, f"{code}: {count(code)}, expected {n}"

    expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, lambda: list(ticks_rpc(b"x", timeout=0.3)))
    wait_for_count("DEADLINE_EXCEEDED", 1)
    call = ticks_rpc(b"x", timeout=30)
    assert next(call) == b"tick"
    call.cancel()
    wait_for_count("CANCELLED", 1)
    assert count("DEADLINE_EXCEEDED") == 1 and count("UNKNOWN") == 0


def test_a_taken_port_is_an_error(make_server, vit_server):
    with pytest.raises(OSError, match="cannot listen"):
        make_server("vit", port=vit_server.server.port)
