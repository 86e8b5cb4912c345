"""The mirror ledger: what was sampled and what was lost, so a crash loses nothing silently.

Each process that samples or drops pairs appends lines `<pair_id>\\t<event>` to its own file
`<dir>/<run>.<process>.ledger`: `sampled` when a request is picked for the shadow, `dropped
<reason>` when its pair will never exist. Lines go out with one `os.write` on an `O_APPEND`
descriptor: they are in the kernel's page cache at once, so they survive a `kill -9` of the
gateway (not a power cut: no fsync per line, to keep the request path free).

After a restart, `reconcile` reads the ledgers of earlier runs and the store: every sampled
pair is stored, or dropped with a reason, or (sampled and then neither: the crash took it)
counted as `crash`. The shadow worker runs it at start and removes the files it has accounted
for. `reconcile` is pure; `Ledger` and `read_ledgers` are the file I/O.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SUFFIX = ".ledger"


class Ledger:
    """An append-only ledger file of one process (one line per event, one write per line)."""

    def __init__(self, directory: str | os.PathLike[str], run: str, process: str):
        self.path = Path(directory) / f"{run}.{process}{SUFFIX}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def sampled(self, pair_id: str) -> None:
        self._write(f"{pair_id}\tsampled\n")

    def dropped(self, pair_id: str, reason: str) -> None:
        self._write(f"{pair_id}\tdropped {reason}\n")

    def _write(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def earlier_runs(directory: str | os.PathLike[str], run: str) -> list[Path]:
    """The ledger files in `directory` written by runs other than `run`."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"*{SUFFIX}") if not p.name.startswith(f"{run}."))


def read_ledgers(paths: Iterable[Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Sampled pair ids and `(pair_id, reason)` drops, in file order. A line torn by the crash
    (no newline at the end) is skipped: its event was not completely written."""
    sampled, dropped = [], []
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]:
            pair_id, _, event = line.partition("\t")
            if event == "sampled":
                sampled.append(pair_id)
            elif event.startswith("dropped "):
                dropped.append((pair_id, event.removeprefix("dropped ")))
    return sampled, dropped


@dataclass(frozen=True)
class Reconciliation:
    sampled: int
    stored: int
    dropped: dict[str, int] = field(default_factory=dict)  # by reason, `crash` included
    crashed: tuple[str, ...] = ()  # pair ids the crash took

    @property
    def balanced(self) -> bool:
        return self.sampled == self.stored + sum(self.dropped.values())


def reconcile(sampled: list[str], dropped: list[tuple[str, str]],
              stored: Callable[[list[str]], set[str]]) -> Reconciliation:
    """Account for every sampled pair: stored (`stored(ids)` says which ids the store holds),
    dropped with its first recorded reason, or lost in a crash (`crash`)."""
    ids = list(dict.fromkeys(sampled))
    in_store = stored(ids) if ids else set()
    reasons: dict[str, str] = {}
    for pair_id, reason in dropped:
        reasons.setdefault(pair_id, reason)
    counts: Counter[str] = Counter()
    crashed = []
    for pair_id in ids:
        if pair_id in in_store:
            continue
        if pair_id in reasons:
            counts[reasons[pair_id]] += 1
        else:
            counts["crash"] += 1
            crashed.append(pair_id)
    return Reconciliation(len(ids), len(in_store & set(ids)), dict(counts), tuple(crashed))
