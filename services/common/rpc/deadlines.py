"""Deadlines and cancellation, checked between the steps of a request (never inside a forward)."""

from __future__ import annotations

import threading

import grpc

from services.common.contracts import Cancelled, DeadlineExceeded

_NO_DEADLINE = 1e7  # grpc reports a huge time_remaining() when the client set no deadline


def time_remaining(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left before the deadline, or None when there is none."""
    if context is None:
        return None
    left = context.time_remaining()
    return None if left is None or left > _NO_DEADLINE else left


def check_active(context: grpc.ServicerContext | None) -> None:
    """Raise DeadlineExceeded / Cancelled when the request should not go on."""
    if context is None:
        return
    left = time_remaining(context)
    if left is not None and left <= 0:
        raise DeadlineExceeded("the request's deadline passed before the work was done")
    if not context.is_active():
        raise Cancelled("the client cancelled the request")


def cancel_event(context: grpc.ServicerContext) -> threading.Event:
    """An Event set when the RPC ends for any reason (cancel, deadline, disconnect); for engine Controls."""
    event = threading.Event()
    context.add_callback(event.set)
    return event
