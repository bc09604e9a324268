"""Whether the Hugging Face Hub answers from here, probed once per test session.

Tests that expect it to be unreachable (the development and CI machines) are skipped where it answers, and
tests that need it are skipped where it does not, so the suite means the same thing on both kinds of machine."""

from __future__ import annotations

import socket

import pytest


def _probe() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


HUB_REACHABLE = _probe()
needs_no_hub = pytest.mark.skipif(HUB_REACHABLE, reason="the Hugging Face Hub is reachable from here")
needs_hub = pytest.mark.skipif(not HUB_REACHABLE, reason="the Hugging Face Hub is not reachable from here")
