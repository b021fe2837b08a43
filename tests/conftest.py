import os

import pytest

from kfsim.inputs import make_setup

# Triton's CPU interpreter has to be chosen before any kernel is defined, and the test modules import measure.* in
# whatever order pytest collects them: chosen here, once, before any of them, for every test module (on a GPU the
# kernels compile as usual)
try:
    import torch
except ImportError:  # kfsim's own tests need no torch
    torch = None
if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def setup_of():
    """make_setup with the ideal engine unless told otherwise."""

    def make(gpu="h100-sxm", model="gpt-j-6b", engine="ideal", **kw):
        return make_setup(gpu=gpu, model=model, engine=engine, **kw)

    return make
