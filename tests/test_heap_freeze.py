"""runtime/heap.py: the objects that exist are frozen out of the cyclic collector while an engine has work, and
given back when it has none (after its last step, an abort that leaves it idle, or close), counted across engines;
a heap someone else froze is left alone; garbage from before a run is collected after it."""

from __future__ import annotations

import gc
import weakref

import pytest

from fastllm import LLM, SamplingParams
from fastllm.runtime import heap
from tests._models import build


@pytest.fixture(autouse=True)
def unfrozen_heap():
    if gc.get_freeze_count():
        pytest.skip("something in this process froze the heap already")
    yield
    assert heap._holders == 0, "a test left a hold behind"
    gc.unfreeze()


def test_holds_are_counted_across_engines():
    a, b = heap.HeapHold(), heap.HeapHold()
    a.hold()
    a.hold()  # one engine holds once, however often it asks
    frozen = gc.get_freeze_count()
    assert frozen > 0 and heap._holders == 1
    b.hold()
    a.release()
    assert gc.get_freeze_count() > 0 and heap._holders == 1  # b still holds (not unfrozen: that leaves 0)
    b.release()
    b.release()
    assert gc.get_freeze_count() == 0 and heap._holders == 0


def test_a_hold_let_go_while_held_gives_the_heap_back():
    hold = heap.HeapHold()
    hold.hold()
    assert gc.get_freeze_count() > 0
    del hold  # an engine dropped mid-run, without close
    assert gc.get_freeze_count() == 0 and heap._holders == 0


def test_a_heap_frozen_by_someone_else_stays_frozen_and_off_means_off(monkeypatch):
    gc.freeze()
    # Theirs, not frozen again nor unfrozen here. (Not the count before == after: frozen objects can die meanwhile,
    # e.g. under pytest-xdist, whose worker's I/O thread frees its messages: seen 1044674 -> 1044672.)
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    hold = heap.HeapHold()
    hold.hold()
    hold.release()
    assert calls == [] and gc.get_freeze_count() > 0
    monkeypatch.undo()
    gc.unfreeze()
    monkeypatch.setattr(heap, "FREEZE_WHILE_STEPPING", False)
    hold.hold()
    assert gc.get_freeze_count() == 0 and not hold.held


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    with LLM(build("llama", tmp_path_factory.mktemp("llama"))) as engine:
        yield engine


def test_frozen_while_the_engine_steps_and_given_back_when_it_is_idle(llm):
    runner = llm.core.runner
    execute, seen = runner.execute, []

    def watched(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return execute(*args, **kwargs)

    garbage = _Cycle()
    collected = weakref.ref(garbage)
    del garbage  # cyclic garbage from before the run: frozen with everything else while it runs
    runner.execute = watched
    try:
        out = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    finally:
        del runner.execute
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    assert seen and all(count > 0 for count in seen)
    assert gc.get_freeze_count() == 0 and not llm.core._heap.held
    gc.collect()
    assert collected() is None  # collected once the run gave the heap back


def test_an_abort_that_leaves_the_engine_idle_gives_the_heap_back(llm):
    core = llm.core
    request = core.add([5, 6, 7], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    core.step()
    core.step()
    assert core._heap.held and gc.get_freeze_count() > 0
    core.abort(request.request_id)
    while core.step():  # a step still in flight (asynchronous scheduling) is read and dropped
        pass
    assert not core._heap.held and gc.get_freeze_count() == 0
