"""Crash points for tests: `EQAT_CRASH_AT=<name>` makes the process SIGKILL itself at that point.

Killing a run at an exact moment (half-way through writing a checkpoint) cannot be timed from outside;
these named points let the crash-safety tests do it deterministically. Unset, they cost one dict lookup.
"""
from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("EQAT_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
