import pytest

from kfsim.inputs import make_setup


@pytest.fixture
def setup_of():
    """make_setup with the ideal engine unless told otherwise."""

    def make(gpu="h100-sxm", model="gpt-j-6b", engine="ideal", **kw):
        return make_setup(gpu=gpu, model=model, engine=engine, **kw)

    return make
