"""Tapes: what the numba kernels' forward records for their backward (cpu_step.py), kept from
one window to the next of the same shape, and from a step that is gone to the next of its
shape, rather than taken fresh from the OS each window.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import numpy as np


class Tapes:
    """What the forward records for the backward, kept from one window to the next of the same
    shape: a set per shape, for the last few shapes (a race alternates between families whose
    tapes differ). A fresh tape of a few hundred
    KB comes fresh from the OS, and the kernels' first writes to it page-faulted: at state 16,
    3 layers, K = 28, about 600 faults per window, 40 % of the forward's time. The kernels
    write every entry of a tape before they read it, so what a kept tape held before never
    matters (a test fills them with NaN between windows).

    The tapes of a step that is gone (its lanes were dropped: a `train` that returned) go to
    this process's `TapePool`, where the next step of their shape finds them: at state 128,
    K = 128, 120 MB of fresh tapes made a first window up to 0.6 s longer (a window: 0.6 s)."""

    KEPT_SHAPES = 4

    def __init__(self) -> None:
        # Per (model_first, shape), the oldest first: the tapes in the order they were taken.
        self._kept: dict[tuple[bool, tuple], list[np.ndarray]] = {}
        weakref.finalize(self, TAPE_POOL.give_all, self._kept).atexit = False

    @property
    def kept(self) -> list[np.ndarray]:
        """Every tape kept, of every shape."""
        return [tape for tapes in self._kept.values() for tape in tapes]

    def for_window(
        self, shape: tuple, model_first: bool
    ) -> Callable[[tuple[int, ...]], np.ndarray]:
        """`take(full_shape)`, which hands out the tapes of a window of `shape` (any hashable
        key of everything the tapes' shapes depend on) on the family whose tapes are
        `model_first` or not, in the order it is called: the n-th tape taken is the n-th of
        the last window of that shape and family."""
        key = (model_first, shape)
        kept = self._kept.pop(key, None)
        if kept is None:
            kept = TAPE_POOL.take(key)
        self._kept[key] = kept  # now the newest
        while len(self._kept) > self.KEPT_SHAPES:
            del self._kept[next(iter(self._kept))]
        taken = iter(range(1 << 30))

        def take(full_shape: tuple[int, ...]) -> np.ndarray:
            n = next(taken)
            if n == len(kept):
                kept.append(np.empty(full_shape, np.float32))
            return kept[n]

        return take

    def clear(self) -> None:
        """Let go of every tape (a race is decided: the winner takes fresh ones once)."""
        self._kept.clear()


class TapePool:
    """Sets of tapes that no step holds, by (model_first, shape), each handed to one step at
    a time (a study's trainer steps several sets of lanes in threads of their own), at most
    `max_bytes` of them, the oldest let go first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Reentrant: a step collected by the garbage collector while the lock is held (an
        # allocation here may run it) gives its tapes back from within.
        self._lock = threading.RLock()
        self._sets: dict[tuple[bool, tuple], list[np.ndarray]] = {}

    def take(self, key: tuple[bool, tuple]) -> list[np.ndarray]:
        """The set of tapes of `key`, now the caller's alone, or an empty list."""
        with self._lock:
            return self._sets.pop(key, [])

    def give_all(self, sets: dict[tuple[bool, tuple], list[np.ndarray]]) -> None:
        """Keep the sets of a step that is gone, the newest last, within `max_bytes`."""
        with self._lock:
            for key, tapes in sets.items():
                if tapes:
                    self._sets.pop(key, None)
                    self._sets[key] = tapes
            while self._sets and self.bytes() > self.max_bytes:
                del self._sets[next(iter(self._sets))]

    def bytes(self) -> int:
        """What the tapes held here take."""
        return sum(tape.nbytes for tapes in self._sets.values() for tape in tapes)

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()


TAPE_POOL = TapePool(max_bytes=512 * 2**20)
"""The tapes of steps gone, for the next step of their shape in this process: the size of
a few sets at state 128, K = 128 (120 MB each), what a process gives back at its exit."""
