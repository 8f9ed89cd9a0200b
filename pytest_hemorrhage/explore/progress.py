"""A transient progress bar for long explorations and endpoint measures, drawn only on an
interactive terminal."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..handle import Handle

__all__ = ["progress"]


@contextmanager
def progress(
    hemorrhage: Handle, total: int, description: str, unit: str | None = None
) -> Iterator[Callable[[], None]]:
    """``advance()`` per step (thread-safe); a transient rich bar on the terminal once the run
    looks long; with ``unit``, the bar shows steps done of ``total`` and their rate
    (``12/40 3.1 req/s``).

    The bar appears only where pytest writes to an interactive terminal (not on an xdist
    worker, nor under ``-p no:terminal``), after the first step predicts more than two seconds
    to go; pytest's capture is suspended just while the bar is drawn. Nothing of it reaches a
    report or outlives the block.
    """
    stream = sys.__stderr__
    config = getattr(getattr(hemorrhage, "node", None), "config", None)
    plugins = config.pluginmanager if config is not None else None
    capman = plugins.getplugin("capturemanager") if plugins is not None else None
    state: dict[str, Any] = {
        "done": 0,
        "start": time.perf_counter(),
        "bar": None,
        "interactive": stream is not None
        and not hasattr(config, "workerinput")
        and (plugins is None or plugins.getplugin("terminalreporter") is not None),
    }
    lock = threading.Lock()  # an endpoint's responses arrive on its client's threads

    def outside() -> Any:
        return capman.global_and_fixture_disabled() if capman is not None else nullcontext()

    def advance() -> None:
        with lock:
            step()

    def step() -> None:
        state["done"] += 1
        if not state["interactive"]:
            return
        bar = state["bar"]
        if bar is None:
            elapsed = time.perf_counter() - state["start"]
            if elapsed / state["done"] * (total - state["done"]) < 2.0:
                return
            from rich.console import Console
            from rich.progress import Progress

            with outside():  # while pytest captures, stderr is a file, not the terminal
                console = Console(file=stream)  # decides it is interactive when created
                state["interactive"] = console.is_interactive
                if not state["interactive"]:
                    return
                columns = () if unit is None else _counted()
                bar = Progress(
                    *columns,
                    console=console,
                    transient=True,
                    auto_refresh=False,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                state["bar"] = bar
                state["task"] = bar.add_task(
                    description, total=total, completed=state["done"], rate=""
                )
                bar.start()
        elapsed = time.perf_counter() - state["start"]
        rate = f"{state['done'] / elapsed:.1f} {unit}/s" if unit and elapsed > 0 else ""
        with outside():
            bar.update(state["task"], completed=min(state["done"], total), rate=rate)
            bar.refresh()

    try:
        yield advance
    finally:
        with lock:
            if state["bar"] is not None:
                with outside():
                    state["bar"].stop()
            state["interactive"] = False  # a late advance() draws nothing


def _counted() -> tuple[Any, ...]:
    """The columns of a bar that counts its steps: done of the total, and their rate."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
