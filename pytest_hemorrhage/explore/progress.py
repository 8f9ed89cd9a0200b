"""A transient progress bar for long explorations, drawn only on an interactive terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..handle import Handle

__all__ = ["progress"]


@contextmanager
def progress(hemorrhage: Handle, total: int, description: str) -> Iterator[Callable[[], None]]:
    """``advance()`` per step; a transient rich bar on the terminal once the run looks long.

    The bar appears only on an interactive terminal, after the first step predicts more than
    two seconds to go; pytest's capture is suspended just while the bar is drawn.
    """
    stream = sys.__stderr__
    config = getattr(getattr(hemorrhage, "node", None), "config", None)
    capman = config.pluginmanager.getplugin("capturemanager") if config is not None else None
    state: dict[str, Any] = {
        "done": 0,
        "start": time.perf_counter(),
        "bar": None,
        "interactive": stream is not None and not hasattr(config, "workerinput"),
    }

    def outside() -> Any:
        return capman.global_and_fixture_disabled() if capman is not None else nullcontext()

    def advance() -> None:
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
                bar = Progress(
                    console=console,
                    transient=True,
                    auto_refresh=False,
                    redirect_stdout=False,
                    redirect_stderr=False,
                )
                state["bar"] = bar
                state["task"] = bar.add_task(description, total=total, completed=state["done"])
                bar.start()
        with outside():
            bar.update(state["task"], completed=min(state["done"], total))
            bar.refresh()

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            with outside():
                state["bar"].stop()
