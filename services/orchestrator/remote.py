"""The workflows' ViT / VAE / LLM client interfaces over gRPC, so services/orchestrator/workflows.py
runs distributed without a change:

    clients = remote_clients("vit:50051", "vae:50052", "llm:50053", store=ObjectStore(cfg), token=t)
    clients.calls.job_id = "job-42"
    out = workflows.edit(clients, image, "make it blue")

Tensors between the services stay in the bucket when a store is given: the ViT and VAE deliver their
outputs as objects, and the items they return carry those keys on to the LLM, which reads them itself;
the orchestrator fetches such a tensor only if something reads it. The final latent is stored under the
job and comes back as a RemoteLatent (its key), which the VAE client hands to the VAE service to decode:
the worker moves keys and bytes, never tensors, and does not import torch. Without a store everything
travels inline. Status codes become the engine's exceptions where the workflows know them (INVALID_ARGUMENT ->
InputError, CANCELLED -> Cancelled); any other failure stays a grpc.RpcError with its code.
"""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import grpc
import numpy as np
from PIL import Image

from services.common.config import BagelConfig
from services.common.contracts import (Cancelled, ContextItem, Controls, ImageParams, ImageResult, InputError,
                                       Progress, SessionRef, TextParams, UnderstandResult, VAEImageItem,
                                       ViTImageItem, messages)
from services.common.protos import common_pb2, llm_pb2, llm_pb2_grpc, vae_pb2, vae_pb2_grpc, vit_pb2, vit_pb2_grpc
from services.common.storage import ObjectStore, StorageNotConfigured
from services.orchestrator.plan import DEFAULT_CONFIG
from services.orchestrator.workflows import Clients

if TYPE_CHECKING:
    import torch

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the servers' default limit
_STAGES = {llm_pb2.TEXT_STAGE_THINK: "think", llm_pb2.TEXT_STAGE_ANSWER: "answer"}


@dataclass
class CallOptions:
    """What every call of one set of clients carries."""

    metadata: tuple[tuple[str, str], ...] = ()  # e.g. (("authorization", "Bearer ..."),)
    timeout: float | None = None                # per call, in seconds
    job_id: str = ""                            # key namespace of the outputs: jobs/{job_id}/...


class Fetcher:
    """Reads a tensor message's inline copy, or its object from the bucket."""

    def __init__(self, store: ObjectStore | None):
        self.store = store

    def __call__(self, ref: common_pb2.TensorRef, inline: common_pb2.Tensor | None) -> torch.Tensor:
        if inline is not None:
            from services.common.tensor_codec import tensor_from_message  # torch, only when a tensor is read

            return tensor_from_message(inline)
        if self.store is None:
            raise StorageNotConfigured("this client has no object store to read the returned key from")
        return self.store.get_tensor(ref.key, ref.bucket or None)


# ---- items that stay in the bucket ----------------------------------------------------------------
class RemoteViTImageItem(ViTImageItem):
    """ViT features as the ViT service returned them: `message` goes on to the LLM unchanged; the tensor
    is fetched only if something reads `.features`."""

    def __init__(self, message: common_pb2.ViTFeatures, fetch: Fetcher):
        self.message, self.grid = message, (message.grid.rows, message.grid.cols)
        self._fetch, self._features = fetch, None

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            m = self.message
            self._features = self._fetch(m.ref, m.inline if m.HasField("inline") else None)
        return self._features


class RemoteVAEImageItem(VAEImageItem):
    """A VAE latent as the VAE service returned it (see RemoteViTImageItem)."""

    def __init__(self, message: common_pb2.Latent, fetch: Fetcher):
        self.message, self._fetch, self._latent = message, fetch, None

    @property
    def latent(self) -> torch.Tensor:
        if self._latent is None:
            m = self.message
            self._latent = self._fetch(m.ref, m.inline if m.HasField("inline") else None)
        return self._latent


class RemoteLatent:
    """The generated latent as the LLM service returned it: a stored object's key (or an inline copy when
    there is no store). The VAE service decodes it from there; the worker never reads the tensor."""

    def __init__(self, message: common_pb2.Latent, fetch: Fetcher):
        self.message, self._fetch = message, fetch

    def fetch(self) -> torch.Tensor:
        """The tensor [z, H/8, W/8] (reads the object; imports torch)."""
        m = self.message
        return self._fetch(m.ref, m.inline if m.HasField("inline") else None)


def item_message(item: ContextItem, down: int) -> llm_pb2.ContextItem:
    if isinstance(item, RemoteViTImageItem):
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vit=item.message))
    if isinstance(item, RemoteVAEImageItem):
        return llm_pb2.ContextItem(image=llm_pb2.ImageItem(vae=item.message))
    return messages.item_message(item, down=down)


@contextmanager
def engine_errors():
    """The statuses the workflows have an exception for become that exception."""
    try:
        yield
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
            raise InputError(e.details()) from None
        if e.code() == grpc.StatusCode.CANCELLED:
            raise Cancelled(e.details() or "cancelled") from None
        raise


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)  # lossless; level 1: fast, wire is local
    return buf.getvalue()


class PngOnce:
    """PNG bytes of the image encoded last: an edit sends the same resized picture to the ViT and the VAE,
    which then costs one encode (~36 ms at 512 px) instead of two. Safe across threads: a caller always
    gets the bytes of its own image."""

    def __init__(self):
        self._lock = threading.Lock()
        self._image: Image.Image | None = None
        self._data = b""

    def __call__(self, image: Image.Image) -> bytes:
        with self._lock:
            if image is self._image:
                return self._data
        data = png(image)
        with self._lock:
            self._image, self._data = image, data
        return data


# ---- the three clients ---------------------------------------------------------------------------
class GrpcViT:
    def __init__(self, channel: grpc.Channel, calls: CallOptions, fetch: Fetcher, delivery: int,
                 encode: Callable[[Image.Image], bytes] = png):
        self.stub, self.calls, self.fetch, self.delivery = vit_pb2_grpc.ViTServiceStub(channel), calls, fetch, delivery
        self.png = encode

    def encode(self, images: Sequence[Image.Image]) -> list[ViTImageItem]:
        req = vit_pb2.ViTEncodeRequest(inputs=[vit_pb2.ViTEncodeInput(image=common_pb2.ImageRef(encoded=self.png(im)))
                                               for im in images], delivery=self.delivery, job_id=self.calls.job_id)
        with engine_errors():
            resp = self.stub.Encode(req, metadata=self.calls.metadata, timeout=self.calls.timeout)
        return [RemoteViTImageItem(f, self.fetch) for f in resp.features]


class GrpcVAE:
    def __init__(self, channel: grpc.Channel, calls: CallOptions, fetch: Fetcher, delivery: int,
                 encode: Callable[[Image.Image], bytes] = png):
        self.stub, self.calls, self.fetch, self.delivery = vae_pb2_grpc.VAEServiceStub(channel), calls, fetch, delivery
        self.png = encode

    def encode(self, image: Image.Image) -> VAEImageItem:
        # The workflows hand over images already at their VAE size, as the in-process engine expects.
        req = vae_pb2.VAEEncodeRequest(inputs=[vae_pb2.VAEEncodeInput(image=common_pb2.ImageRef(encoded=self.png(image)),
                                                                      resize=vae_pb2.RESIZE_NONE)],
                                       delivery=self.delivery, job_id=self.calls.job_id)
        with engine_errors():
            (latent,) = self.stub.Encode(req, metadata=self.calls.metadata, timeout=self.calls.timeout).latents
        return RemoteVAEImageItem(latent, self.fetch)

    def decode(self, latent: RemoteLatent | torch.Tensor) -> np.ndarray:
        """A latent the LLM service returned goes on as it came (by key); a tensor held here goes inline."""
        if isinstance(latent, RemoteLatent):
            message = latent.message
        else:
            from services.common.tensor_codec import tensor_to_message

            message = common_pb2.Latent(inline=tensor_to_message(latent))
        req = vae_pb2.VAEDecodeRequest(inputs=[vae_pb2.VAEDecodeInput(latent=message)],
                                       delivery=common_pb2.DELIVERY_INLINE, job_id=self.calls.job_id)
        with engine_errors():
            (out,) = self.stub.Decode(req, metadata=self.calls.metadata, timeout=self.calls.timeout).images
        return np.asarray(Image.open(io.BytesIO(out.png)).convert("RGB"))  # uint8 [H, W, 3]


class GrpcLLM:
    def __init__(self, channel: grpc.Channel, calls: CallOptions, fetch: Fetcher, delivery: int, down: int):
        self.stub, self.calls, self.fetch, self.delivery = llm_pb2_grpc.LLMServiceStub(channel), calls, fetch, delivery
        self.down = down  # the VAE downsample, to size the latents sent inline

    def understand(self, items: Sequence[ContextItem], params: TextParams | None = None, think: bool = False,
                   controls: Controls | None = None, session: SessionRef | None = None) -> UnderstandResult:
        # Explicit parameters: the in-process engine's defaults, whatever the server's are.
        req = llm_pb2.GenerateTextRequest(items=[item_message(it, self.down) for it in items],
                                          params=messages.text_params_message(params or TextParams()), think=think,
                                          session=_session_options(session))
        done = self._stream(self.stub.GenerateText, req, controls)
        return UnderstandResult(text=done.text, think=done.think or None, tokens=done.tokens)

    def generate_image(self, items: Sequence[ContextItem], params: ImageParams, think: bool = False,
                       think_params: TextParams | None = None, controls: Controls | None = None,
                       session: SessionRef | None = None) -> ImageResult:
        req = llm_pb2.GenerateImageRequest(items=[item_message(it, self.down) for it in items],
                                           params=messages.image_params_message(params), think=think,
                                           think_params=messages.text_params_message(think_params),
                                           delivery=self.delivery, job_id=self.calls.job_id,
                                           session=_session_options(session))
        done = self._stream(self.stub.GenerateImage, req, controls)
        # With explicit noise the engine reports the seed it was given (None when none was).
        seed = params.seed if params.noise is not None else done.seed
        return ImageResult(latent=RemoteLatent(done.latent, self.fetch), seed=seed, think=done.think or None)

    def delete_session(self, session_id: str) -> bool:
        """End a conversation now; False when the service had no such session."""
        with engine_errors():
            reply = self.stub.DeleteSession(llm_pb2.DeleteSessionRequest(session_id=session_id),
                                            metadata=self.calls.metadata, timeout=self.calls.timeout)
        return reply.deleted

    def _stream(self, method: Callable, request, controls: Controls | None):
        """Relay a stream's progress to controls, cancel the call when asked, return its final message."""
        controls = controls or Controls()
        text, done = {"think": "", "answer": ""}, None
        with engine_errors():
            call = method(request, metadata=self.calls.metadata, timeout=self.calls.timeout)
            try:
                for event in call:  # read to the end, so the call finishes with OK rather than a cancel
                    kind = event.WhichOneof("event")
                    if kind == "done":
                        done = event.done
                    elif kind == "progress":
                        controls.report(Progress("denoise", event.progress.step, event.progress.total))
                    else:
                        delta = event.think if kind == "think" else event.delta
                        stage = _STAGES.get(delta.stage, "answer")
                        text[stage] += delta.text
                        controls.report(Progress(stage, delta.tokens, delta.max_tokens, text[stage]))
                    if controls.cancel.is_set() and done is None:
                        raise Cancelled("request cancelled")
            except BaseException:
                call.cancel()  # the server drops the request at its next step
                raise
        if done is None:
            raise RuntimeError("the stream ended without its final event")
        return done


def _session_options(session: SessionRef | None) -> llm_pb2.SessionOptions | None:
    if session is None:
        return None
    return llm_pb2.SessionOptions(id=session.id, ttl_seconds=session.ttl_s, resume=session.resume)


@dataclass
class RemoteClients(Clients):
    calls: CallOptions = field(default_factory=CallOptions)
    channels: list[grpc.Channel] = field(default_factory=list)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def remote_clients(vit: str, vae: str, llm: str, *, store: ObjectStore | None = None, token: str | None = None,
                   timeout: float | None = None, job_id: str = "",
                   credentials: grpc.ChannelCredentials | None = None,
                   cfg: BagelConfig = DEFAULT_CONFIG) -> RemoteClients:
    """Clients for the servers at three host:port addresses; with `store`, tensors travel by key. `cfg` is
    the servers' model config (the orchestrator's, as for plan_job, by default)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]

    def channel(address: str) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(address, credentials, options=options)
        return grpc.insecure_channel(address, options=options)

    calls = CallOptions((("authorization", f"Bearer {token}"),) if token else (), timeout, job_id)
    fetch = Fetcher(store)
    by_key = common_pb2.DELIVERY_OBJECT if store is not None else common_pb2.DELIVERY_INLINE
    channels = [channel(a) for a in (vit, vae, llm)]
    once = PngOnce()
    return RemoteClients(vit=GrpcViT(channels[0], calls, fetch, by_key, once),
                         vae=GrpcVAE(channels[1], calls, fetch, by_key, once),
                         llm=GrpcLLM(channels[2], calls, fetch, by_key, cfg.ae.downsample), calls=calls,
                         channels=channels)
