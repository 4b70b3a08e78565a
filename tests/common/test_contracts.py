"""The shared contracts: every error declares one gRPC status and one HTTP code, and every reader (the gRPC
interceptor's table, the HTTP layer, the job failure record) gets its answer from that declaration."""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest

import services
from services.common import contracts
from services.common.contracts import (Cancelled, ImageParams, InputError, NotFound, ServiceError, SessionRef,
                                       TextParams, TooLarge, grpc_code_of, http_status_of)
from services.common.rpc.errors import status_for


def _all_service_errors() -> list[type[ServiceError]]:
    """Every ServiceError subclass defined anywhere in the project (the modules are imported to find them)."""
    for mod in pkgutil.walk_packages(services.__path__, "services."):
        if mod.name.startswith("services._generated") or mod.name.endswith("celery_app"):
            continue  # generated code; celery_app builds an app on import
        importlib.import_module(mod.name)
    seen, todo = [], [ServiceError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


def test_every_error_declares_a_real_grpc_status_and_an_http_error_code():
    errors = _all_service_errors()
    names = {e.__name__ for e in errors}
    # the errors each role raises are all in the hierarchy (not ValueError / RuntimeError of their own)
    assert {"ObjectNotFound", "StorageError", "KVCacheFull", "SchedulerClosed", "ImageError", "TensorCodecError",
            "SessionNotFound", "JobNotFound", "QueueFull", "BadObjectKey", "KServeInputError"} <= names
    for cls in errors:
        assert cls.grpc_code in grpc.StatusCode.__members__, cls
        assert cls.grpc_code != "OK" and 400 <= cls.http_status < 600, cls
        exc = cls("x")
        assert status_for(exc) == grpc.StatusCode[cls.grpc_code]
        assert http_status_of(exc) == cls.http_status


@pytest.mark.parametrize("name, code, http", [
    ("ObjectNotFound", "NOT_FOUND", 404),          # a StorageError (UNAVAILABLE) that says NOT_FOUND
    ("StorageError", "UNAVAILABLE", 503),
    ("StorageNotConfigured", "FAILED_PRECONDITION", 409),
    ("BucketNotAllowed", "PERMISSION_DENIED", 403),
    ("KVCacheFull", "RESOURCE_EXHAUSTED", 429),
    ("SessionBusy", "ABORTED", 409),
    ("SchedulerClosed", "UNAVAILABLE", 503),
    ("ImageError", "INVALID_ARGUMENT", 400),
    ("TooLarge", "INVALID_ARGUMENT", 413),
    ("Cancelled", "CANCELLED", 499),
    ("DeadlineExceeded", "DEADLINE_EXCEEDED", 504),
])
def test_the_statuses_each_error_stands_for(name, code, http):
    cls = next(e for e in _all_service_errors() if e.__name__ == name)
    assert (grpc_code_of(cls("x")), http_status_of(cls("x"))) == (code, http)


def test_errors_of_other_libraries_and_unexpected_ones():
    import redis
    import torch

    assert grpc_code_of(redis.ConnectionError("down")) == "UNAVAILABLE"
    assert http_status_of(redis.ConnectionError("down")) == 503
    assert grpc_code_of(torch.OutOfMemoryError("oom")) == "RESOURCE_EXHAUSTED"
    assert grpc_code_of(ValueError("a library refused a value")) == "INVALID_ARGUMENT"
    assert (grpc_code_of(KeyError("bug")), http_status_of(KeyError("bug"))) == ("INTERNAL", 500)
    assert status_for(RuntimeError("bug")) == grpc.StatusCode.INTERNAL


def test_errors_stay_what_callers_catch():
    assert isinstance(InputError("x"), ValueError) and isinstance(NotFound("x"), LookupError)
    assert str(NotFound("unknown session 'a'")) == "unknown session 'a'"  # not quoted as KeyError would
    assert issubclass(TooLarge, InputError)


def test_parameters_validate_with_their_field_in_the_message():
    from services.common.config import preset

    with pytest.raises(InputError, match="max_new_tokens"):
        TextParams(max_new_tokens=0).validate()
    with pytest.raises(InputError, match="top_p"):
        TextParams(top_p=1.5).validate()
    cfg = preset("tiny")
    ImageParams(width=32, height=48).validate(cfg)
    with pytest.raises(InputError, match="width"):
        ImageParams(width=33).validate(cfg)
    with pytest.raises(InputError, match="cfg_interval"):
        ImageParams(cfg_interval=(0.6, 0.4)).validate(cfg)
    with pytest.raises(InputError, match="cfg_renorm_type"):
        ImageParams(cfg_renorm_type="nope").validate(cfg)
    edit = ImageParams.for_edit(64, 32, seed=3)
    assert (edit.cfg_img_scale, edit.cfg_interval, edit.cfg_renorm_type, edit.seed) == (2.0, (0.0, 1.0),
                                                                                        "text_channel", 3)
    assert SessionRef("a") == SessionRef("a", 0) and hash(SessionRef("a"))  # frozen: usable as a key


def test_cancellation_and_progress_hooks():
    seen = []
    controls = contracts.Controls(on_progress=seen.append)
    controls.check()
    controls.report(contracts.Progress("denoise", 1, 4))
    controls.cancel.set()
    with pytest.raises(Cancelled):
        controls.check()
    assert seen == [contracts.Progress("denoise", 1, 4)]
