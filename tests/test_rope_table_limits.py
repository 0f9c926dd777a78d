"""rope_table's guard on an output's size a position: checked on a few positions before the whole table is computed,
so an output too wide for a table (a P x P mask, say) never costs max_model_len times its row at start-up."""

import torch
from test_passes import _eager, _PositionMixingRope, _rand, _rope_table_rewrite

from fastllm.passes import rope_table
from fastllm.passes.rope_table import _MAX_ROW_ELEMENTS


class _WideRope(_PositionMixingRope):
    """cos/sin rows of 2 x (_MAX_ROW_ELEMENTS + 1) values a position: past the table's limit."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.rand(_MAX_ROW_ELEMENTS + 1) * 1e-3, persistent=False)

    def forward(self, x, positions):
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos() * x + emb.sin()  # no kernel here: the table's candidates are what reaches one


def test_too_wide_outputs_are_refused_before_the_whole_table(monkeypatch):
    evaluated = []
    original = rope_table._evaluate

    def recording(ctx, derived, positions, output, value):
        evaluated.append(value.shape[-1])
        return original(ctx, derived, positions, output, value)

    monkeypatch.setattr(rope_table, "_evaluate", recording)
    monkeypatch.setattr(rope_table, "_feeds_kernels_only", lambda node, reading: True)  # every chain a candidate
    torch.manual_seed(0)
    module = _WideRope()
    x, positions = _rand(1, 3, 1, 2 * (_MAX_ROW_ELEMENTS + 1)), torch.tensor([[1, 2, 5]])
    out, matches, _ = _rope_table_rewrite(module, x, positions, max_positions=50_000)
    assert matches == 0
    assert evaluated and max(evaluated) <= 3  # only the few-position samples, never the 50,000 positions
    torch.testing.assert_close(out, _eager(module, x, positions), rtol=0, atol=0)
