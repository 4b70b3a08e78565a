"""Kernel tests run under the Triton interpreter on machines without a GPU.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set before
services.llm.kernels is imported. On a CUDA machine `TRITON_INTERPRET=0 pytest tests/kernels` runs
the compiled kernels on the GPU instead (plus the bf16/fp16 GPU-only tests).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# If something imported the kernels before this file ran (another test calling the attention registry),
# they were built for the other mode: drop them so the test module re-imports them for this one.
_want_interp = os.environ["TRITON_INTERPRET"] not in ("0", "", "false", "False")
_kb = sys.modules.get("services.llm.kernels.backend")
if _kb is not None and _kb.kernels_interpreted() != _want_interp:
    for _name in [m for m in sys.modules if m.startswith("services.llm.kernels.")]:
        del sys.modules[_name]
