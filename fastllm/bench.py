"""`fastllm bench`: one model's speed with Hugging Face eager and with fastllm, measured the same way in one process.

    fastllm bench [MODEL] [--input-len 128] [--output-len 256] [--num-prompts 1] [--quantization fp8|int8|int4]

Prompts are random token ids (seeded), each exactly `input_len` tokens, and every completion runs to exactly
`output_len` tokens (greedy; fastllm ignores EOS, Hugging Face masks it with `min_new_tokens`), so both sides do the
same work. Each side is timed after a warm-up: the whole set generating one token (t1; for one prompt the median of
three runs) and generating `output_len` (tN). As the project's W1 and W2 workloads measure: one prompt gives TTFT = t1
and decode tok/s = (output_len - 1) / (tN - t1); several give output tok/s = prompts x output_len / tN and requests/s.
Hugging Face eager runs the prompts in batches of `hf_batch_size` (equal lengths: no padding); fastllm runs them all
through `fastllm.LLM`, which schedules them itself. Hugging Face runs first: `fastllm.LLM(model)` optimizes the model in
place.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm


@dataclass
class BenchResult:
    """One provider's timings of the same prompts."""

    provider: str
    num_prompts: int
    output_len: int
    first_token_s: float  # t1: every prompt generating one token
    seconds: float  # tN: every prompt generating output_len tokens

    @property
    def output_tok_s(self) -> float:
        return self.num_prompts * self.output_len / self.seconds

    @property
    def requests_s(self) -> float:
        return self.num_prompts / self.seconds

    @property
    def decode_tok_s(self) -> float | None:
        """W1's decode rate, for a single prompt of at least two new tokens (None otherwise, or if tN <= t1)."""
        if self.num_prompts != 1 or self.output_len < 2 or self.seconds <= self.first_token_s:
            return None
        return (self.output_len - 1) / (self.seconds - self.first_token_s)

    def as_dict(self) -> dict:
        return asdict(self) | {"output_tok_s": self.output_tok_s, "requests_s": self.requests_s,
                               "decode_tok_s": self.decode_tok_s,
                               "ttft_ms": self.first_token_s * 1e3 if self.num_prompts == 1 else None}


def random_prompts(vocab_size: int, num_prompts: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """`num_prompts` lists of `input_len` token ids drawn uniformly from the vocabulary (the same for a seed)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, input_len), generator=generator).tolist()


# One prompt's TTFT (t1, from which the decode rate is taken too) is the median of this many one-token runs: a single
# run of a few milliseconds can take longer than the whole output_len run on a busy machine. Several prompts report
# neither, so their t1 is timed once.
FIRST_TOKEN_RUNS = 3


def timed(fn, device: torch.device):
    """(fn(), its wall seconds), the device's queued work finished before and after (`fastllm run` times so too)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def first_token_seconds(generate_one, device: torch.device, num_prompts: int) -> float:
    """t1: the seconds of `generate_one()` (every prompt generating one token), the median of FIRST_TOKEN_RUNS runs
    for a single prompt."""
    runs = FIRST_TOKEN_RUNS if num_prompts == 1 else 1
    return statistics.median(timed(generate_one, device)[1] for _ in range(runs))


def bench_hf(model, prompts: list[list[int]], output_len: int, batch_size: int) -> BenchResult:
    """Hugging Face eager `generate` over the prompts, `batch_size` at a time, greedy, exactly `output_len` new
    tokens each."""
    device = next(model.parameters()).device
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    pad = (pad[0] if isinstance(pad, (list, tuple)) else pad) if pad is not None else 0
    batches = [torch.tensor(prompts[i:i + batch_size], device=device) for i in range(0, len(prompts), batch_size)]

    def generate(new_tokens: int, ids_list=batches) -> None:
        bar = tqdm(ids_list, desc=f"hf_eager: {new_tokens} new tokens", unit="batch", leave=False,
                   disable=len(ids_list) < 2)
        for ids in bar:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):  # the work timed is the work claimed
                raise RuntimeError(f"fastllm bench: Hugging Face generated {tuple(out.shape)} for prompts of "
                                   f"{tuple(ids.shape)} and {new_tokens} new tokens")

    with torch.no_grad():
        generate(2, batches[:1])  # warm-up: kernels chosen, memory allocated
        first = first_token_seconds(lambda: generate(1), device, len(prompts))
        _, total = timed(lambda: generate(output_len), device)
    return BenchResult("hf_eager", len(prompts), output_len, first, total)


def bench_fastllm(llm, prompts: list[list[int]], output_len: int, provider: str = "fastllm") -> BenchResult:
    """`llm.generate` over the prompts (greedy, EOS ignored, exactly `output_len` new tokens each)."""
    from fastllm.runtime.sampling_params import SamplingParams

    device = llm.runner.device

    def generate(new_tokens: int, batch=prompts) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        for output in llm.generate(batch, params, use_tqdm=len(batch) > 1):
            if output.error is not None:
                raise RuntimeError(f"fastllm bench: a request failed: {output.error}")
            if len(output.outputs[0].token_ids) != new_tokens:  # the work timed is the work claimed
                raise RuntimeError(f"fastllm bench: a request generated {len(output.outputs[0].token_ids)} tokens, "
                                   f"not {new_tokens}")

    generate(2, prompts[:1])  # warm-up (CUDA graphs are recorded when the LLM is built)
    first = first_token_seconds(lambda: generate(1), device, len(prompts))
    _, total = timed(lambda: generate(output_len), device)
    return BenchResult(provider, len(prompts), output_len, first, total)
