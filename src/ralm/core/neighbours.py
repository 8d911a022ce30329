"""``NeighbourLog``: what a method retrieved for which targets, written while it scores and read by the
leakage report (``ralm.eval.leakage``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class NeighbourLog:
    """Which neighbour token sequences were used to score which targets of one document.

    ``add(start, end, neighbours)``: targets [start, end) — indices into ``Targets.ids``, so the first
    scored target is ``Targets.first`` — were scored with ``neighbours`` (possibly none). Call it as often
    as the method retrieves: once per block (in-context RALM) or per position (kNN-LM).
    """

    def __init__(self) -> None:
        # identical neighbours recur across blocks and positions: store each distinct sequence once
        self._ids: dict[tuple[int, ...], int] = {}
        self.sequences: list[tuple[int, ...]] = []
        self._arrays: list[np.ndarray] = []  # the same sequences as int64 arrays, for the LCS
        self.entries: list[tuple[int, int, list[int]]] = []  # (start, end, indices into sequences)

    def add(self, start: int, end: int, neighbours: Sequence[Sequence[int]]) -> None:
        if not 0 <= start <= end:
            raise ValueError(f"bad target range [{start}, {end})")
        refs = []
        for seq in neighbours:
            arr = np.asarray(seq, dtype=np.int64).reshape(-1)
            key = tuple(arr.tolist())
            if key not in self._ids:
                self._ids[key] = len(self.sequences)
                self.sequences.append(key)
                self._arrays.append(arr)
            refs.append(self._ids[key])
        self.entries.append((start, end, refs))

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[int, int, list[tuple[int, ...]]]]:
        """(start, end, neighbour sequences) per ``add`` call, in order."""
        for start, end, refs in self.entries:
            yield start, end, [self.sequences[r] for r in refs]
