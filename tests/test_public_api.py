"""The public API: every name in ``__all__`` is importable and documented."""

import bilevel_jax as bj


def test_all_is_sorted_and_importable():
    assert list(bj.__all__) == sorted(bj.__all__)
    for name in bj.__all__:
        assert hasattr(bj, name), name


def test_every_public_name_has_a_docstring():
    for name in bj.__all__:
        assert (getattr(bj, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_version():
    assert isinstance(bj.__version__, str) and bj.__version__
