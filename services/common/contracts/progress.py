"""Progress reports and cancellation: what every long operation gives its caller between two steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from services.common.contracts.errors import Cancelled


@dataclass
class Progress:
    stage: str          # "think", "answer", "denoise" or "decode"
    step: int           # steps (or tokens) done
    total: int          # steps (or the token budget)
    text: str = ""      # decoded text so far, for token stages


@dataclass
class Controls:
    """Per-request hooks: progress callback and cancellation flag, checked between steps."""

    on_progress: Callable[[Progress], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("request cancelled")

    def report(self, p: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(p)
