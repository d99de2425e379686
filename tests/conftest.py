"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(params=["native", "eager"])
def core(request, monkeypatch):
    """Run a test on the compiled interval core (native.py) and on the eager one: both must meet the
    same reference. The compiled one is skipped only where no C compiler builds it."""
    from reformer import native

    native.library.cache_clear()
    if request.param == "eager":
        monkeypatch.setenv("REFORMER_NATIVE", "0")
    elif native.library() is None:
        pytest.skip("no C compiler builds the compiled interval core here")
    yield request.param
    native.library.cache_clear()
