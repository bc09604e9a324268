"""Small helpers for calls to the outside world: a hard deadline and one-line error text."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_with_deadline(fn: Callable[[], T], timeout: float) -> T:
    """Run `fn()` in a daemon thread; raise TimeoutError if it has not returned after `timeout` seconds.

    Socket and HTTP timeouts do not bound name resolution; this does, so an unreachable host never hangs a run.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    t = threading.Thread(target=target, daemon=True, name="qabot-deadline")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def one_line(err: BaseException, limit: int = 240) -> str:
    """`Type: message` on one line, cut to `limit` characters."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
