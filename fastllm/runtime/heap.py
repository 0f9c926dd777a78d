"""Python's cyclic garbage collector kept off the objects that already exist while an engine steps.

Why: a full (oldest-generation) collection traverses every tracked object in the process: with torch,
transformers and a model loaded, ~200 ms on a 2-core CPU. The engine allocates thousands of small objects a step at
hundreds of sequences (scheduled chunks, lists of ids and slots), which triggers such a collection every few dozen
steps: averaged, 3.2 ms of a 7.4 ms host step at 512 sequences and 2.8 of 10.6 at 1024 (benchmarks/bench_host_step.py,
host-step-cpu-20261130-2.json; frozen: 4.0 and 7.7 ms), and each one is a ~200 ms stall of every stream in
flight. `gc.freeze()` moves every object that exists into a permanent generation the collector skips; objects made
afterwards are collected as usual.

Frozen only while an engine has work (its first step after being idle freezes, the step that leaves it idle or its
close unfreezes), so garbage cycles that existed before (a model the user let go) wait for the end of the run, not
forever. Process-wide and counted: the heap stays frozen while any engine in the process holds it. A heap frozen by
someone else (gc.get_freeze_count() > 0 before the first hold) is left to them: nothing is frozen or unfrozen here
(one they freeze while an engine holds it is unfrozen with the engine's at its release).
"""

from __future__ import annotations

import gc
import threading
import weakref

FREEZE_WHILE_STEPPING = True  # benchmarks/bench_host_step.py measures with and without

_lock = threading.Lock()
_holders = 0
_froze = False  # whether the current hold froze the heap (else it was frozen already, by someone else)


class HeapHold:
    """One engine's share of the process-wide freeze: `hold()` while it has work, `release()` when it has none. A
    hold dropped while held (an engine let go mid-run without close) is released by its finalizer."""

    def __init__(self) -> None:
        self._state = [False]  # held; shared with the finalizer, which must not keep `self` alive
        weakref.finalize(self, _release, self._state)

    @property
    def held(self) -> bool:
        return self._state[0]

    def hold(self) -> None:
        global _holders, _froze
        if self._state[0] or not FREEZE_WHILE_STEPPING:
            return
        with _lock:
            if _holders == 0:
                _froze = gc.get_freeze_count() == 0
                if _froze:
                    gc.freeze()
            _holders += 1
            self._state[0] = True

    def release(self) -> None:
        _release(self._state)


def _release(state: list[bool]) -> None:
    global _holders, _froze
    if not state[0]:
        return
    with _lock:
        state[0] = False
        _holders -= 1
        if _holders == 0 and _froze:
            gc.unfreeze()
            _froze = False
