"""The job API over gRPC (`bagel.v1.JobService`), sync (grpc) and async (grpc.aio)."""

from __future__ import annotations

from typing import AsyncIterator, Iterator

import grpc

from bagel_serve.client.errors import from_grpc
from services.common.protos import jobs_pb2, jobs_pb2_grpc, llm_pb2

# Replies may carry a finished PNG inline: allow more than gRPC's 4 MiB default.
_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def _credentials(tls) -> grpc.ChannelCredentials:
    """TLS credentials: the system roots, or the root certificate given as a path or PEM bytes."""
    if tls is None or tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (bytes, bytearray)):
        return grpc.ssl_channel_credentials(root_certificates=bytes(tls))
    with open(tls, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


class GrpcTransport:
    def __init__(self, target: str, secure: bool, token: str | None, timeout: float, tls=None):
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = (grpc.secure_channel(target, _credentials(tls), options=_OPTIONS) if secure
                        else grpc.insecure_channel(target, options=_OPTIONS))
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None = -1.0):
        try:
            return method(request, timeout=self.timeout if timeout == -1.0 else timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_grpc(e) from None

    def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        return self._call(self.stub.Submit, req)

    def get(self, job_id: str, inline_image: bool = False) -> jobs_pb2.Job:
        return self._call(self.stub.Get, jobs_pb2.GetJobRequest(id=job_id, inline_image=inline_image))

    def wait(self, job_id: str, timeout: float | None, inline_image: bool = False) -> jobs_pb2.Job:
        last = None
        for last in self._stream(jobs_pb2.GetJobRequest(id=job_id, inline_image=inline_image), timeout):
            pass
        return last

    def watch(self, job_id: str) -> Iterator[jobs_pb2.Job]:
        return self._stream(jobs_pb2.GetJobRequest(id=job_id), None)

    def _stream(self, request, timeout: float | None) -> Iterator[jobs_pb2.Job]:
        call = self.stub.Watch(request, timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_grpc(e) from None
        finally:
            call.cancel()  # a caller that stops iterating early ends the stream at once

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self.stub.Cancel, jobs_pb2.GetJobRequest(id=job_id))

    def delete_session(self, session_id: str) -> None:
        # The gateway waits for a worker to end the session: allow it more than a plain call.
        self._call(self.stub.DeleteSession, llm_pb2.DeleteSessionRequest(session_id=session_id),
                   timeout=max(self.timeout, 90.0))


class AsyncGrpcTransport:
    def __init__(self, target: str, secure: bool, token: str | None, timeout: float, tls=None):
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = (grpc.aio.secure_channel(target, _credentials(tls), options=_OPTIONS) if secure
                        else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method, request, timeout: float | None = -1.0):
        try:
            return await method(request, timeout=self.timeout if timeout == -1.0 else timeout,
                                metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_grpc(e) from None

    async def submit(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        return await self._call(self.stub.Submit, req)

    async def get(self, job_id: str, inline_image: bool = False) -> jobs_pb2.Job:
        return await self._call(self.stub.Get, jobs_pb2.GetJobRequest(id=job_id, inline_image=inline_image))

    async def wait(self, job_id: str, timeout: float | None, inline_image: bool = False) -> jobs_pb2.Job:
        last = None
        async for last in self._stream(jobs_pb2.GetJobRequest(id=job_id, inline_image=inline_image), timeout):
            pass
        return last

    def watch(self, job_id: str) -> AsyncIterator[jobs_pb2.Job]:
        return self._stream(jobs_pb2.GetJobRequest(id=job_id), None)

    async def _stream(self, request, timeout: float | None) -> AsyncIterator[jobs_pb2.Job]:
        call = self.stub.Watch(request, timeout=timeout, metadata=self.metadata)
        try:
            async for job in call:
                yield job
        except grpc.RpcError as e:
            raise from_grpc(e) from None
        finally:
            call.cancel()

    async def cancel(self, job_id: str) -> jobs_pb2.Job:
        return await self._call(self.stub.Cancel, jobs_pb2.GetJobRequest(id=job_id))

    async def delete_session(self, session_id: str) -> None:
        await self._call(self.stub.DeleteSession, llm_pb2.DeleteSessionRequest(session_id=session_id),
                         timeout=max(self.timeout, 90.0))
