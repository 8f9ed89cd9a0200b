"""The one way the tests build a Harness: ``build_harness``, which the ``make_harness`` fixture
in conftest.py hands out and module- or session-scoped fixtures call directly."""

from __future__ import annotations

from typing import Any


def build_harness(
    loaded: Any, tokenizer: Any = None, /, *, spec: str = "model", **settings: Any
) -> Any:
    """A Harness over ``loaded`` with the command-line defaults and ``settings`` over them.

    Args:
        loaded: a LoadedModel, or a bare model (then ``tokenizer`` is required).
        tokenizer: the bare model's tokenizer; with a LoadedModel, leave it out.
        spec: the bare model's name (LoadedModel.spec), which is also ``Settings.model``.
        **settings: Settings fields over ``Settings.defaults``; ``model`` defaults to the
            loaded model's spec.

    Returns:
        The Harness.
    """
    from pytest_hemorrhage.harness import Harness
    from pytest_hemorrhage.loading import LoadedModel
    from pytest_hemorrhage.settings import Settings

    if not isinstance(loaded, LoadedModel):
        if tokenizer is None:
            raise TypeError("build_harness: a bare model needs its tokenizer")
        loaded = LoadedModel(model=loaded, tokenizer=tokenizer, spec=spec)
    elif tokenizer is not None:
        raise TypeError("build_harness: a LoadedModel carries its tokenizer; pass none")
    return Harness(loaded, Settings.defaults(**{"model": loaded.spec, **settings}))
