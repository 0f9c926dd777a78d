"""The batched sampler (`sample_tokens`) against Hugging Face's own logits processors, its draws against the
distribution it reports, and `SamplingParams` validation."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fastllm.runtime.sampler import RowContext, sample_rows, sample_tokens
from fastllm.runtime.sampling_params import MAX_LOGPROBS, MAX_N, MAX_STOP_STRINGS, SamplingParams

EOS = 2
INF = float("inf")


def _row(prompt=(5, 6, 7), output=(), eos=(EOS,), generator=None, bad_words=(), **params) -> RowContext:
    """A row as the engine (and, next, generate()) builds it: EOS masked while fewer than min_tokens are out."""
    p = SamplingParams(**params)
    masked = frozenset(eos) if len(output) < p.min_tokens else frozenset()
    return RowContext(p, list(prompt), list(output), generator, [list(w) for w in bad_words], masked)


def _hf_processors(row: RowContext) -> LogitsProcessorList:
    """HF's processors for this row, in the order `GenerationMixin._get_logits_processor` builds them."""
    p = row.params
    processors = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.min_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(len(row.prompt_token_ids), p.min_tokens, [EOS]))
    if p.temperature == 0:  # do_sample=False: no warpers
        return processors
    if p.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k:
        processors.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        processors.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        processors.append(MinPLogitsWarper(p.min_p))
    return processors


def _hf_scores(logits: torch.Tensor, rows: list[RowContext]) -> torch.Tensor:
    """Each row through its own HF processors (HF runs one setting per batch, so one row at a time)."""
    out = []
    for i, row in enumerate(rows):
        input_ids = torch.tensor([row.prompt_token_ids + row.output_token_ids])
        out.append(_hf_processors(row)(input_ids, logits[i:i + 1].clone())[0])
    return torch.stack(out)


def _assert_same_scores(ours: torch.Tensor, hf: torch.Tensor) -> None:
    """The -inf masks identical; finite values equal to within one fp32 ulp. Both sides run the same fp32
    elementwise ops (one multiply or divide per processor, parameters rounded to fp32 the same way), so on CPU
    they agree bitwise; one ulp allows only for a division done as multiplication by the reciprocal."""
    assert torch.equal(ours == -INF, hf == -INF), "different tokens filtered out"
    assert not ours.isnan().any() and not (ours == INF).any()
    finite = hf != -INF
    torch.testing.assert_close(ours[finite], hf[finite], rtol=2.0**-23, atol=0.0)


def _logits(vocab: int, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def _boundary_top_p(row_logits: torch.Tensor, position: int) -> tuple[float, float]:
    """(top_p that HF's rule puts exactly on the boundary of the `position`-th least likely token, the next
    larger top_p that keeps it). HF removes a token when its ascending cumulative probability c satisfies
    c <= 1 - top_p in fp32; top_p = 1 - c makes that an equality (c is an fp32 below 1/2, so 1 - c and
    1 - (1 - c) are exact in double)."""
    cumulative = row_logits.sort().values.softmax(-1).cumsum(-1)
    c = cumulative[position].item()
    assert 0 < c < 0.5
    below = torch.nextafter(torch.tensor(c), torch.tensor(0.0)).item()  # the fp32 just below c
    return 1 - c, 1 - below


def _min_p_on_boundary(row_logits: torch.Tensor, rank: int) -> float:
    """A min_p whose bound fp32(min_p) * max prob equals the probability of the `rank`-th most likely token
    exactly (HF keeps a token whose probability equals the bound: it removes `probs < bound`)."""
    probs = row_logits.softmax(-1)
    target, top = probs.sort(descending=True).values[rank], probs.max()
    candidate = target / top
    for _ in range(8):  # the quotient's rounding may be an ulp off; step towards the product that matches
        product = candidate * top
        if product == target:
            return candidate.item()
        candidate = torch.nextafter(candidate, candidate * 2 if product < target else torch.zeros(()))
    raise AssertionError("no fp32 min_p puts this token on the boundary")


@pytest.mark.parametrize("vocab", [97, 1000])
def test_processed_scores_match_hugging_face(vocab):
    logits = _logits(vocab, 17)
    # Exact ties: two low tokens of row 3 moved onto its 5th largest value (top-k keeps all three tied);
    # row 9 has four equal leaders (min_p = 1 keeps exactly them: the `probs < bound` equality case); row 16
    # has four dominant equal leaders that top_p = 0.5 splits (which ones stay follows HF's sort).
    logits[3, logits[3].argsort()[:2]] = logits[3].topk(5).values[-1]
    logits[9, :4] = logits[9].max() + 1.0
    logits[16, :4] = logits[16].max() + 3.0
    # Row 12: a finite score whose probability underflows to 0; top-p is off for it (HF skips the warper, so
    # it keeps its value) while other rows run top-p.
    logits[12, 0] = -1e4
    logits[13] = logits[7]
    exact, just_above = _boundary_top_p(logits[7], vocab // 2)
    min_p = _min_p_on_boundary(logits[8], 3)
    history = dict(prompt=[1, 3, 3, 5, vocab - 1, vocab + 3], output=[5, 8, 8, 0])  # vocab + 3: ignored, as HF
    rows = [
        _row(temperature=0),
        _row(temperature=0, repetition_penalty=1.3, **history),
        _row(temperature=0.7),
        _row(top_k=5),
        _row(top_p=0.9),
        _row(min_p=0.05),
        _row(temperature=1.4, repetition_penalty=0.8, top_k=40, top_p=0.85, min_p=0.02, **history),
        _row(top_p=exact),
        _row(min_p=min_p),
        _row(min_p=1.0),
        _row(temperature=0, min_tokens=3, output=[4]),
        _row(temperature=0.9, min_tokens=3, output=[4, 9, 9], repetition_penalty=1.1),  # min_tokens reached
        _row(temperature=1.2, top_k=vocab + 5),  # k >= V keeps everything
        _row(top_p=just_above),
        _row(temperature=0.5, min_tokens=2, top_k=3),  # EOS masked before top-k
        _row(temperature=0, repetition_penalty=2.0, min_tokens=1, prompt=[EOS, 4], output=[]),
        _row(top_p=0.5),
    ]
    raw = logits.clone()
    tokens, scores = sample_tokens(logits, rows, return_scores=True)
    assert torch.equal(logits, raw), "the caller's logits were modified"
    hf = _hf_scores(logits, rows)
    _assert_same_scores(scores, hf)
    # The cases above really are the edge cases: ties kept at the top-k threshold, the boundary token
    # dropped at top_p = 1 - c and kept just above it, min_p's equality kept, a tie split by top-p, the
    # underflowing score kept finite, the min_tokens mask in place only before min_tokens.
    kept = (scores > -INF).sum(-1).tolist()
    assert kept[3] == 7 and kept[9] == 4 and kept[8] == 4 and kept[16] == 3
    assert kept[7] == vocab - (vocab // 2 + 1) and kept[13] == vocab - vocab // 2
    assert kept[12] == vocab
    assert scores[10, EOS] == -INF and scores[11, EOS] > -INF and scores[14, EOS] == -INF
    greedy = [i for i, r in enumerate(rows) if r.params.temperature == 0]
    assert torch.equal(tokens[greedy], hf[greedy].argmax(-1))
    assert all(scores[i, t] > -INF for i, t in enumerate(tokens.tolist()))


def test_greedy_batch_reports_penalized_logits():
    logits = _logits(97, 3, seed=1)
    rows = [_row(temperature=0), _row(temperature=0, repetition_penalty=1.5, output=[1, 2, 3]),
            _row(temperature=0, min_tokens=2)]
    tokens, scores = sample_tokens(logits, rows, return_scores=True)
    _assert_same_scores(scores, _hf_scores(logits, rows))
    assert torch.equal(tokens, scores.argmax(-1))
    # Nothing to change in a plain greedy batch: the logits themselves, no copy.
    plain = logits[:1]
    assert sample_tokens(plain, rows[:1], return_scores=True)[1] is plain


def test_logits_are_never_modified():
    """Logprobs are computed from the raw logits after sampling, so no path may write into them, including a
    batch of greedy and sampled rows with nothing to mask or penalize (whose scores start as `logits`)."""
    logits = _logits(97, 4, seed=3)
    raw = logits.clone()
    batches = [[_row(temperature=0), _row(top_k=3), _row(temperature=0), _row(min_p=0.2)],
               [_row(), _row(), _row(top_p=0.5), _row(temperature=0.5)],
               [_row(temperature=0, min_tokens=1), _row(repetition_penalty=1.5), _row(temperature=0),
                _row(temperature=0.8, min_tokens=1)]]
    for rows in batches:
        for return_scores in (False, True):
            out = sample_tokens(logits, rows, return_scores=return_scores)
            assert torch.equal(logits, raw)
        _assert_same_scores(out[1], _hf_scores(logits, rows))
    assert torch.equal(out[1][2], logits[2])  # a greedy row with nothing to change reports its logits


def test_top_p_boundary_is_hugging_faces_rule():
    """At top_p = 1 - c (c the cumulative probability of the boundary token and all less likely ones),
    the kept mass is exactly top_p without that token. HF's rule (remove c <= 1 - top_p) drops it; the older
    rule (remove a token once the mass above it exceeds top_p) keeps it. Pin HF's answer."""
    logits = torch.log(torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4]]))
    position = 1  # the 0.1 token: ascending cumulative 0.05 + 0.1
    exact, just_above = _boundary_top_p(logits[0], position)
    order = logits[0].argsort()
    # HF compares in fp32: `1 - top_p` (a double) is rounded to fp32 first. A quarter fp32 ulp above
    # `exact` rounds back onto the boundary, so the token is still dropped (a float64 comparison keeps it).
    c = 1 - exact
    rounds_back = exact + (torch.nextafter(torch.tensor(c), torch.tensor(1.0)).item() - c) / 4
    assert torch.tensor(1 - rounds_back).item() == c and 1 - rounds_back < c
    cases = ((exact, order[position + 1:]), (rounds_back, order[position + 1:]), (just_above, order[position:]))
    for top_p, kept in cases:
        row = _row(top_p=top_p)
        scores = sample_tokens(logits, [row], return_scores=True)[1]
        _assert_same_scores(scores, _hf_scores(logits, [row]))
        assert sorted((scores[0] > -INF).nonzero()[:, 0].tolist()) == sorted(kept.tolist())
    # Exact in real arithmetic too: 4 equal tokens hold 1/4 each; top_p = 0.5 keeps exactly two of them.
    tied = torch.zeros(1, 4)
    scores = sample_tokens(tied, [_row(top_p=0.5)], return_scores=True)[1]
    assert (scores > -INF).sum() == 2


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of `counts` against `probs` (both over the kept tokens)."""
    expected = probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = len(counts) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic.double() / 2).item()


@pytest.mark.parametrize("params", [
    dict(temperature=0.8),
    dict(temperature=1.3, top_k=4),
    dict(top_p=0.8),
    dict(temperature=0.6, min_p=0.1),
    dict(temperature=1.1, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.4, presence_penalty=0.5),
])
def test_draws_follow_the_processed_distribution(params):
    """20k draws of one row's logits: the token counts must fit softmax(processed scores), and a filtered token
    never appears. With 20k draws over <= 12 tokens every expected count is >= 20 (chi-square is valid); for a
    correct sampler a p-value below 1e-4 has probability 1e-4 (and the fixed seed makes the test
    deterministic), while a wrong distribution (the unprocessed one, checked last) gives p-values far below."""
    torch.manual_seed(1234)
    n, vocab = 20_000, 12
    base = torch.linspace(2.0, -2.0, vocab)[None]
    rows = [_row(output=[0, 0, 3], **params) for _ in range(n)]
    tokens, scores = sample_tokens(base.expand(n, vocab), rows, return_scores=True)
    probs = scores[0].softmax(-1)
    assert torch.equal(scores, scores[:1].expand_as(scores))
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept].sum() == 0, "a filtered token was drawn"
    assert (probs[kept] * n >= 20).all()
    assert _chi_square_p_value(counts[kept], probs[kept].double()) > 1e-4
    # The same counts against the unprocessed softmax(logits) fail: the test can tell the processing happened.
    assert _chi_square_p_value(counts, base[0].softmax(-1).double()) < 1e-4


def test_presence_and_frequency_penalties_follow_the_formula():
    logits = _logits(50, 2, seed=2)
    output = [3, 3, 3, 7, 9, 9]
    rows = [_row(temperature=0, presence_penalty=0.6, frequency_penalty=-0.4, output=output),
            _row(temperature=0, presence_penalty=-1.5, frequency_penalty=2.0, repetition_penalty=1.2,
                 prompt=[3, 11], output=output)]
    scores = sample_tokens(logits, rows, return_scores=True)[1]
    counts = torch.bincount(torch.tensor(output), minlength=50).float()
    # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence; prompt tokens do not count.
    expected0 = logits[0] - counts * -0.4 - (counts > 0).float() * 0.6
    repeated = _hf_scores(logits[1:], [_row(temperature=0, repetition_penalty=1.2, prompt=[3, 11], output=output)])
    expected1 = repeated[0] - counts * 2.0 - (counts > 0).float() * -1.5
    # Same fp32 ops (one multiply, one add, one subtract per token): equal to within an ulp of the result.
    torch.testing.assert_close(scores[0], expected0, rtol=2.0**-23, atol=0.0)
    torch.testing.assert_close(scores[1], expected1, rtol=2.0**-23, atol=0.0)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[[3, 7, 9]] = False
    assert torch.equal(scores[0, untouched], logits[0, untouched])


def test_bad_words_and_min_tokens_mask_even_the_argmax():
    logits = torch.zeros(3, 30)
    logits[:, 12] = 5.0  # every row's favourite
    logits[:, 13] = 4.0
    rows = [_row(temperature=0, bad_words=[[12]]),
            _row(temperature=0, bad_words=[[8, 12], [6, 7, 13]], prompt=[6], output=[7]),  # [6, 7] spans both
            _row(temperature=0, min_tokens=2, eos=(12, 99), output=[1])]  # 99 is past the vocabulary
    tokens, scores = sample_tokens(logits, rows, return_scores=True)
    assert tokens.tolist() == [13, 12, 13]
    assert scores[0, 12] == -INF and scores[1, 13] == -INF and scores[2, 12] == -INF
    assert (scores == -INF).sum() == 3
    sampled = [_row(bad_words=[[12], [13]]), _row(min_tokens=1, eos=(12, 13), top_k=2)]
    for _ in range(20):
        assert not {12, 13} & set(sample_tokens(logits[:2], sampled).tolist())


def _seeded_draws(rows_factory, steps=20):
    """Tokens of row 0 over `steps` steps, with fresh generators and the global RNG disturbed in between."""
    logits = _logits(1000, 4, seed=5)
    rows = rows_factory()
    out = []
    for step in range(steps):
        torch.manual_seed(step * 7 + len(rows))  # the global RNG differs between the calls compared
        out.append(sample_tokens(logits[:len(rows)], rows)[0].item())
    return out


def test_seeded_rows_ignore_the_batch():
    def alone():
        return [_row(temperature=1.5, generator=torch.Generator().manual_seed(42))]

    def shared():
        return [_row(temperature=1.5, generator=torch.Generator().manual_seed(42)),
                _row(temperature=0.7, top_k=3), _row(temperature=0),
                _row(temperature=1.0, generator=torch.Generator().manual_seed(7))]

    first = _seeded_draws(alone)
    assert first == _seeded_draws(alone) == _seeded_draws(shared)
    other = _seeded_draws(lambda: [_row(temperature=1.5, generator=torch.Generator().manual_seed(43))])
    assert first != other  # the seed is what decides (20 draws over ~1000 tokens)


def test_no_host_reads_while_sampling(monkeypatch):
    """Asynchronous scheduling samples while the GPU still runs: sample_tokens must not read a device value on
    the host. On CPU a sync cannot be observed, so the ways to read one (`.item()`, `.tolist()`, `bool()`,
    `int()`, `float()`, `.nonzero()`, `.cpu()`, `.numpy()`) raise here instead."""
    logits = _logits(97, 6, seed=8)
    rows = [_row(temperature=0, repetition_penalty=1.2, output=[1, 1]), _row(top_k=10, min_tokens=2),
            _row(top_p=0.7, generator=torch.Generator().manual_seed(3)), _row(min_p=0.1, presence_penalty=1.0),
            _row(temperature=0, bad_words=[[5]]), _row(temperature=0.6, frequency_penalty=0.5, output=[3])]

    def host_read(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    tokens, scores = sample_tokens(logits, rows, return_scores=True)
    monkeypatch.undo()
    assert tokens.shape == (6,) and scores.shape == logits.shape


def test_return_scores_does_not_change_tokens():
    logits = _logits(97, 5, seed=6)

    def rows():
        return [_row(temperature=0, repetition_penalty=1.2, output=[1]), _row(top_k=10),
                _row(top_p=0.7, generator=torch.Generator().manual_seed(3)), _row(min_p=0.1, presence_penalty=1.0),
                _row(temperature=0)]

    torch.manual_seed(9)
    plain = sample_tokens(logits, rows())
    torch.manual_seed(9)
    with_scores, _ = sample_tokens(logits, rows(), return_scores=True)
    assert plain.dtype == torch.int64 and plain.shape == (5,)
    assert torch.equal(plain, with_scores)
    torch.manual_seed(9)
    assert sample_rows(logits, rows()).token_ids == plain.tolist()


# ---- SamplingParams validation ---------------------------------------------------------------------------

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_float_fields_refuse_non_finite(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be (>=?|in) .* and finite, got {value!r}$"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), r"^seed must be None or an integer in \[0, 2\*\*64 - 1\], got -1"),
    (dict(seed=2**64), r"^seed must be None or an integer in \[0, 2\*\*64 - 1\]"),
    (dict(seed=1.0), r"^seed must"),
    (dict(n=10**9), rf"^n must be an integer in \[1, {MAX_N}\], got 1000000000"),
    (dict(n=MAX_N + 1), r"^n must"),
    (dict(logprobs=MAX_LOGPROBS + 1), rf"^logprobs must be None or an integer in \[0, {MAX_LOGPROBS}\], got 21"),
    (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), rf"^stop must have at most {MAX_STOP_STRINGS} entries, got 65"),
    (dict(stop="x" * 1025), r"^stop entries must be at most 1024 characters each, got one of 1025"),
    (dict(stop_token_ids=list(range(65))), r"^stop_token_ids must have at most 64 entries, got 65"),
    (dict(bad_words=["w"] * 65), r"^bad_words must have at most 64 entries, got 65"),
    (dict(bad_words=["w" * 1025]), r"^bad_words entries must be at most 1024 characters"),
    (dict(max_tokens=0), r"^max_tokens must be an integer >= 1 or None"),
    (dict(min_tokens=5, max_tokens=4), r"^min_tokens must be <= max_tokens \(4\), got 5"),
])
def test_bounds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bounds_are_inclusive():
    p = SamplingParams(seed=2**64 - 1, n=MAX_N, logprobs=MAX_LOGPROBS, stop=["s" * 1024] * MAX_STOP_STRINGS,
                       stop_token_ids=list(range(64)), bad_words=["b"] * 64, max_tokens=None, min_tokens=10**6)
    assert p.n == MAX_N


def test_completion_seed_wraps_into_the_generators_range():
    assert SamplingParams(seed=5).completion_seed(2) == 7
    top = SamplingParams(seed=2**64 - 1, n=3)
    seeds = [top.completion_seed(i) for i in range(top.n)]
    assert seeds == [2**64 - 1, 0, 1]
    for seed in seeds:
        torch.Generator().manual_seed(seed)  # would raise on 2**64
    with pytest.raises(ValueError, match="seed=None"):
        SamplingParams().completion_seed(0)
