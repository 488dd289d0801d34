"""Where eqat keeps what it computes once and reuses (self-generated calibration sets, tuned kernel configs)."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EQAT_CACHE"


def cache_root() -> Path:
    """`$EQAT_CACHE`, else `~/.cache/eqat`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "eqat"))
