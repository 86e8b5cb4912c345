"""The one sha256 of a file: streamed in 1 MiB blocks, from a path or any open binary file (an
fsspec file included), with an optional callback per block (a progress bar)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

BLOCK = 1 << 20


def sha256_stream(f: IO[bytes], on_block: Callable[[int], object] | None = None) -> str:
    """The hex sha256 of what is left to read in `f`."""
    h = hashlib.sha256()
    while block := f.read(BLOCK):
        h.update(block)
        if on_block is not None:
            on_block(len(block))
    return h.hexdigest()


def sha256_file(path: str | Path, on_block: Callable[[int], object] | None = None) -> str:
    """The hex sha256 of the file at `path`."""
    with open(path, "rb") as f:
        return sha256_stream(f, on_block)
