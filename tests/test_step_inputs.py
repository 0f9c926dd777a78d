"""Step padding for CUDA graphs: StepBuffers' packing rules, and generate() parity when every step is padded to a
graph's shape (emulated on the CPU: the same buffers, run eagerly)."""

import pytest
import torch
import transformers as T

from fastllm.capture import step as compile_step_module
from fastllm.runtime.engine_core import EngineCore
from fastllm.runtime.kv_cache import KVCacheConfig
from fastllm.runtime.model_runner import ModelRunner, decode_buckets, prefill_buckets
from fastllm.runtime.step_inputs import StepBuffers, StepInput
from tests._models import VOCAB, build, optimize


def _step(query_lens, starts, sample=True):
    """A StepInput of sequences with the given query lengths starting at the given positions (block size 4)."""
    step = StepInput([], [], [], [], [], [], [])
    for i, (n, start) in enumerate(zip(query_lens, starts)):
        blocks = [10 * i + b for b in range(-(-(start + n) // 4))]
        step.token_ids += [100 + i] * n
        step.positions += range(start, start + n)
        step.slots += [blocks[p // 4] * 4 + p % 4 for p in range(start, start + n)]
        step.seq_lens.append(start + n)
        step.query_lens.append(n)
        step.block_tables.append(blocks)
        if sample:
            step.sample_rows.append(len(step.token_ids) - 1)
    return step


def test_decode_buffers_pad_with_one_token_dummies():
    buffers = StepBuffers(4, 4, 4, 3, "cpu", one_token_dummies=True, max_seqlen_q=1)
    step = _step([1, 1, 1], [5, 2, 8])
    assert buffers.fits(step)
    buffers.fill(step)
    buffers.scatter()
    assert buffers.input_ids.tolist() == [[100, 101, 102, 0]]
    assert buffers.positions.tolist() == [[5, 2, 8, 0]]
    assert buffers.metadata.slot_mapping.tolist()[3] == -1  # the dummy token writes nothing
    assert buffers.metadata.seq_lens.tolist() == [6, 3, 9, 1]
    assert buffers.metadata.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4]
    assert buffers.logits_indices.tolist() == [0, 1, 2, 2]
    assert buffers.block_tables.tolist() == [[0, 1, 0], [10, 0, 0], [20, 21, 22], [0, 0, 0]]
    assert buffers.metadata.max_seqlen_q == 1
    assert not buffers.fits(_step([2, 1], [0, 3]))          # not a decode step
    assert not buffers.fits(_step([1] * 5, [0] * 5))        # too many sequences


def test_prefill_buffers_put_padding_in_one_dummy_sequence():
    buffers = StepBuffers(16, 5, 5, 4, "cpu", one_token_dummies=False, max_seqlen_q=16)
    step = _step([5, 1], [0, 7])
    assert buffers.fits(step)
    buffers.fill(step)
    buffers.scatter()
    md = buffers.metadata
    assert md.cu_seqlens_q.tolist() == [0, 5, 6, 16, 16, 16]   # dummy of 10 tokens, then two empty ones
    assert md.seq_lens.tolist() == [5, 8, 10, 0, 0]
    assert md.slot_mapping.tolist()[6:] == [-1] * 10
    assert buffers.logits_indices.tolist() == [4, 5, 5, 5, 5]
    assert md.max_seqlen_q == 16  # fixed at capture: any value > 1 selects the prefill kernel
    # Only the columns in use are copied (here 1): entries past each row's blocks keep the previous step's
    # values, which are block ids that exist; dummy rows read block 0 where they are read (column 0).
    buffers.fill(_step([2], [0], sample=False))
    buffers.scatter()
    tables = buffers.block_tables.tolist()
    assert tables[0] == [0, 1, 0, 0] and tables[1] == [0, 11, 0, 0] and tables[2:] == [[0] * 4] * 3
    assert {b for row in tables for b in row} <= {0, 1, 10, 11}
    assert buffers.logits_indices.tolist() == [0] * 5  # nothing sampled: row 0 stands in, never read
    assert not buffers.fits(_step([17], [0]))                 # too many tokens
    assert not buffers.fits(_step([3] * 5, [0] * 5))          # padding tokens but no room for a dummy sequence
    assert buffers.fits(_step([4, 4, 4, 4], [0] * 4))


def test_decode_buckets():
    assert decode_buckets(3) == [2, 3] and decode_buckets(64) == [2, 4, *range(8, 65, 8)]
    ladder = decode_buckets(1024)
    assert ladder[:3] == [2, 4, 8] and ladder[-1] == 1024 and len(ladder) == 66
    # Padding a batch up to its bucket adds at most 8 rows up to 256 sequences (where decode is memory-bound, rows
    # nearly free), and at most 1/16 of the rows beyond (where it is compute-bound).
    steps = list(zip(ladder, ladder[1:]))
    assert all(upper - lower <= 8 for lower, upper in steps if upper <= 256)
    assert all((upper - lower) / lower <= 1 / 16 for lower, upper in steps if lower >= 256)
    assert decode_buckets(300)[-2:] == [288, 300]


def test_prefill_buckets():
    assert prefill_buckets(8192) == [16, 32, 64, 128, 256, 512, 1024]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    assert prefill_buckets(8) == []


def _graph_shaped_runtime(path, monkeypatch, **runner_options):
    """(model, runner, graphs used, traces): the model saved at `path` on a CPU runner that pads every step to a graph
    shape (max_num_seqs 4, budget 40 tokens), recording the step graph each step picked and each trace dynamo handed
    to the passes (dynamo's own trace, captured at the first call: a cached graph never recompiles)."""
    model = optimize(T.AutoModelForCausalLM.from_pretrained(path).eval(), warmup=False, graph_cache=False)
    state = model._fastllm_state
    traces = []
    run_passes = compile_step_module.run_passes

    def counting(gm, *args, **kwargs):  # the compile step's passes, counting how often dynamo hands over a trace
        traces.append(len(gm.graph.nodes))
        return run_passes(gm, *args, **kwargs)

    monkeypatch.setattr(compile_step_module, "run_passes", counting)
    runner = ModelRunner(state.compile(), torch.device("cpu"), torch.float32,
                         kv_cache=KVCacheConfig(block_size=4, num_kv_tokens=512), max_num_seqs=4,
                         max_num_batched_tokens=40, emulate_graph_shapes=True, **runner_options)
    state.core = EngineCore(runner, vocab_size=VOCAB, max_num_seqs=4, max_num_batched_tokens=40)
    used = []
    pick = runner._graph_for
    runner._graph_for = lambda step: used.append(pick(step)) or used[-1]
    return model, runner, used, traces


@pytest.mark.parametrize("family", ["llama", "mixtral", "bloom", "gemma2"])
def test_generate_parity_with_graph_shaped_steps(family, tmp_path, monkeypatch):
    """Every step padded to a graph's shape (decode buckets, prefill token buckets, chunked prefill) gives HF's
    greedy tokens: the padding tokens and dummy sequences change nothing for the real ones."""
    build(family, tmp_path)
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, runner, used, traces = _graph_shaped_runtime(tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (5, 23), generator=g)   # 5 rows > max_num_seqs 4: a later admission mixes
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    ids[3, :20], mask[3, :20] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    kinds = {(g.buffers.static_max_seqlen_q == 1) for g in used if g is not None}
    assert kinds == {True, False}, "both decode and prefill graph shapes must have run"
    assert None not in used  # the budget (40) is the largest bucket: every step fits a graph shape
    # One trace serves every shape: no recompilation (each costs seconds on a 7B model, and dynamo stops
    # after its recompile limit).
    assert len(traces) == 1
    assert runner.pool.num_free_blocks == runner.pool.num_blocks


def test_decode_buckets_with_a_one_row_graph():
    assert decode_buckets(4) == [2, 4]
    assert decode_buckets(4, one_row=True) == [1, 2, 4]


def test_one_row_decode_graph_shape_gives_the_padded_steps_tokens(tmp_path, monkeypatch):
    """FASTLLM_ONE_ROW_DECODE's 1-row decode graph shape (emulated on the CPU): one sequence's decode steps run it,
    the step is still traced once (its first call, a prefill, never has one row), and the greedy tokens and scores
    are those of HF eager, as with the padded 2-row steps."""
    build("llama", tmp_path)
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, runner, used, traces = _graph_shaped_runtime(tmp_path, monkeypatch, one_row_decode=True)
    ids = torch.randint(3, VOCAB, (1, 11), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    ours, expected = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, expected.sequences)
    for a, b in zip(ours.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # fp32, as the padded-step parity tests allow
    decode_rows = {g.buffers.input_ids.shape[-1] for g in used if g is not None and g.buffers.static_max_seqlen_q == 1}
    assert decode_rows == {1}
    assert len(traces) == 1
