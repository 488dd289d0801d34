"""Where eqat keeps what it computes once and reuses (self-generated calibration sets, tuned kernel configs),
and how every small file it writes gets there whole."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EQAT_CACHE"


def cache_root() -> Path:
    """`$EQAT_CACHE`, else `~/.cache/eqat`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "eqat"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename: a killed process leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
