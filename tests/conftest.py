"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(params=["native", "eager"])
def core(request):
    """The attention backend to run a test on (ReformerConfig.attention_backend): the compiled interval core
    and the eager one must meet the same reference. The compiled one is skipped only where no C compiler
    builds it."""
    from reformer.ops.backend import available_backends

    if request.param not in available_backends():
        pytest.skip("no C compiler builds the compiled interval core here")
    return request.param
