"""The mirror ledger: what was sampled and what was lost, so a crash loses nothing silently.

Each process that samples or drops pairs appends lines `<pair_id>\t<event>` to its own files
`<dir>/<run>.<process>.<seq>.ledger`: `sampled` when a request is picked for the shadow,
`dropped <reason>` when its pair will never exist. Lines go out with one `os.write` on an
`O_APPEND` descriptor: they are in the kernel's page cache at once, so they survive a `kill -9`
of the gateway (not a power cut: no fsync per line, to keep the request path free). A file is
closed after `max_lines` lines and the next `seq` begins, so no file grows without end.

`reconcile` accounts for the pairs of finished files (`finished`: every file of an earlier run,
and closed files of this run old enough that their mirrors are over): every sampled pair is
stored, or dropped with a reason, or (sampled and then neither: a crash took it) counted as
`crash`. The shadow worker runs it at start and then periodically, and deletes the files it has
accounted for. `reconcile` is pure; the rest is file I/O.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SUFFIX = ".ledger"


class Ledger:
    """The append-only ledger files of one process (one line per event, one write per line).

    A failed write (a full or failing disk) never raises: the line is lost, `on_error` hears of
    it, and the next line tries again (a new file when the old one could not be opened)."""

    def __init__(self, directory: str | os.PathLike[str], run: str, process: str, *,
                 max_lines: int = 100_000, on_error: Callable[[OSError], None] | None = None):
        self.directory, self.prefix, self.max_lines = Path(directory), f"{run}.{process}", max_lines
        self.on_error = on_error
        self._seq, self._lines, self._fd, self._closed = 0, 0, None, False
        self.path = self.directory / f"{self.prefix}.{self._seq:06d}{SUFFIX}"

    def sampled(self, pair_id: str) -> None:
        self._write(f"{pair_id}\tsampled\n")

    def dropped(self, pair_id: str, reason: str) -> None:
        self._write(f"{pair_id}\tdropped {reason}\n")

    def _write(self, line: str) -> None:
        if self._closed:
            return
        try:
            if self._fd is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self.path = self.directory / f"{self.prefix}.{self._seq:06d}{SUFFIX}"
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._fd, line.encode())
        except OSError as e:
            if self.on_error is not None:
                self.on_error(e)
            return
        self._lines += 1
        if self._lines >= self.max_lines:  # the next file; this one is finished
            self._close_file()
            self._seq, self._lines = self._seq + 1, 0

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as e:
                if self.on_error is not None:
                    self.on_error(e)

    def close(self) -> None:
        self._closed = True
        self._close_file()


def _parts(path: Path) -> tuple[str, str]:
    """`(run.process, seq)` of a ledger file name."""
    prefix, _, seq = path.name.removesuffix(SUFFIX).rpartition(".")
    return prefix, seq


def finished(directory: str | os.PathLike[str], run: str, *, now: float,
             min_age_s: float) -> list[Path]:
    """The ledger files whose events are all written: every file of a run other than `run`,
    and this run's closed files (a later `seq` of the same process exists) not modified for
    `min_age_s` seconds (so the mirrors they sampled have finished)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    files = sorted(d.glob(f"*{SUFFIX}"))
    latest: dict[str, str] = {}
    for p in files:
        prefix, seq = _parts(p)
        latest[prefix] = max(latest.get(prefix, ""), seq)
    out = []
    for p in files:
        prefix, seq = _parts(p)
        earlier = not p.name.startswith(f"{run}.")
        if earlier or (seq < latest[prefix] and now - p.stat().st_mtime >= min_age_s):
            out.append(p)
    return out


def current_run(directory: str | os.PathLike[str], run: str) -> list[Path]:
    """This run's ledger files (their drop notes may be about pairs of finished files)."""
    d = Path(directory)
    return sorted(d.glob(f"{run}.*{SUFFIX}")) if d.is_dir() else []


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
