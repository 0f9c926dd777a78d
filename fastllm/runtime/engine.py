"""`LLM`: the offline batch engine (vLLM's `LLM`) on fastllm's runtime.

    llm = fastllm.LLM("path/to/model")        # or LLM(hf_model, tokenizer=tok), optimized or not
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

All prompts of a call go into one scheduler at once (in-flight batching, chunked prefill, preemption when the
KV cache runs out); the sampler applies each request's own SamplingParams in the same step. A request that
cannot run (empty prompt, prompt longer than the context, invalid sampling values, ...) finishes alone with
`finish_reason="abort"` and an `error` message; the others complete.

Stop strings follow vLLM: a completion ends as soon as its detokenized text contains one, and the returned
text is cut before the stop string (`token_ids` keep every generated token, including those that spelled
it). EOS and `stop_token_ids` tokens stay in `token_ids`; the text is decoded with `skip_special_tokens`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import deque
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastllm.runtime.overlap import OverlappedSteps
from fastllm.runtime.sampler import RowContext, needs_host_history, sample_rows, sample_tokens
from fastllm.runtime.sampling_params import SamplingParams
from fastllm.runtime.scheduler import Request, Scheduler, SchedulerOutput

# Scheduling settings the engine takes even for an already-optimized model (they do not touch the runner's
# cache or graphs); every other option must go to optimize().
_ENGINE_OPTIONS = ("max_num_batched_tokens", "max_num_seqs", "enable_prefix_caching", "async_scheduling")
# Upper bounds (seconds) of the latency histogram buckets in `LLM.metrics()`; the last bucket is open.
HISTOGRAM_BOUNDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# metrics() keeps the latest samples only, so a long-running engine (the server) does not grow without bound.
MAX_METRIC_SAMPLES = 10_000


@dataclass
class CompletionOutput:
    """One completion of a prompt.

    Args:
        index: which of the request's `n` completions this is.
        text: the generated text (cut before a stop string); "" without a tokenizer.
        token_ids: the generated tokens.
        finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or the context) or
            "abort" (the request failed: see `RequestOutput.error`).
        logprobs: per generated token, {token id: logprob} for the top `SamplingParams.logprobs` tokens and
            the sampled one (raw model distribution); None unless asked.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    """`time.perf_counter()` stamps of one request; `first_token_time` is None if it generated nothing."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between output tokens after the first (None with fewer than two tokens)."""
        if self.first_token_time is None or self.finish_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    """The result of one prompt.

    Args:
        request_id: the engine's id for it (unique per `LLM`).
        prompt: the prompt string, or None when token ids were given.
        prompt_token_ids: the tokens the model saw (None if the prompt could not be tokenized).
        outputs: `SamplingParams.n` completions, by index.
        finished: always True from `LLM.generate` (every request ends, aborted ones included).
        metrics: arrival, first-token and finish times; TTFT and time per output token.
        error: why the request was aborted ("ValueError: ..."), or None when it ran.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None


@dataclass(eq=False)
class _Sequence:
    """Engine-side state of one completion (one scheduler request)."""

    request: Request
    params: SamplingParams
    output: RequestOutput
    index: int
    generator: torch.Generator | None
    bad_words_token_ids: list[list[int]]
    stop_ids: frozenset[int]  # masked until min_tokens are out
    logprobs: list[dict[int, float]] | None
    first_token_time: float | None = None
    text: str | None = None  # set when a stop string ended it

    def row(self) -> RowContext:
        r = self.request
        masked = self.stop_ids if len(r.output_token_ids) < self.params.min_tokens else frozenset()
        return RowContext(self.params, r.prompt_token_ids, r.output_token_ids, self.generator,
                          self.bad_words_token_ids, masked)


class LLM:
    """An offline batch engine over a Hugging Face causal LM.

    Args:
        model_or_path: a `PreTrainedModel` (optimized by `fastllm.optimize` or not: if not, it is optimized
            here with `**config`) or a local path / hub id loaded with `AutoModelForCausalLM`.
        tokenizer: a tokenizer or its path; default: loaded from `model_or_path` when that is a path. Needed
            for string prompts, text outputs, stop strings and bad words.
        dtype: weights dtype (`torch.dtype` or "auto") when loading from a path, or to convert a model to.
        device: device to load or move the model to.
        **config: `OptimizeConfig` fields (`num_kv_tokens`, `max_num_batched_tokens`, `max_num_seqs`, ...),
            `enable_prefix_caching` (the scheduler reuses the K/V of full prompt blocks computed before) and
            `async_scheduling` (default True: schedule and launch each step while the GPU still samples the
            one before; its sampled tokens reach the next step on the device. Steps whose rows need their
            token history on the host — penalties, bad words, logprobs — wait for it.)
            An already-optimized model takes only these four.

    Raises:
        RuntimeError: the model cannot run on fastllm's paged runtime (the message says why).
    """

    def __init__(self, model_or_path, *, tokenizer=None, dtype=None, device=None, **config) -> None:
        import transformers

        from fastllm.config import OptimizeConfig
        from fastllm.optimize import _build_runtime, optimize

        if isinstance(model_or_path, (str, os.PathLike)):
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = transformers.AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs).eval()
            if tokenizer is None:
                try:
                    tokenizer = transformers.AutoTokenizer.from_pretrained(model_or_path)
                except (OSError, ValueError):
                    tokenizer = None  # token-id prompts still work; string prompts say what is missing
                # transformers 5 builds an empty tokenizer (one special token) for a folder without tokenizer
                # files instead of raising; it would decode every output to "".
                if tokenizer is not None and len(tokenizer) <= 1:
                    tokenizer = None
        else:
            model = model_or_path
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
        state = getattr(model, "_fastllm_state", None)
        known = {f.name for f in dataclasses.fields(OptimizeConfig)}
        # Options optimize() knows go there (for a new model); the others are the engine's own.
        engine_options = {k: config.pop(k) for k in _ENGINE_OPTIONS
                          if k in config and (state is not None or k not in known)}
        if state is None:
            if dtype is not None and not isinstance(model_or_path, (str, os.PathLike)):
                model = model.to(dtype=dtype)
            if device is not None:
                model = model.to(device)
            model = optimize(model, **config)
            state = model._fastllm_state
        elif config or dtype is not None or device is not None:
            given = sorted(config) + [k for k, v in (("dtype", dtype), ("device", device)) if v is not None]
            raise ValueError(f"{type(model).__name__} is already optimized: {', '.join(given)} must be given to "
                             f"fastllm.optimize(); LLM() only takes {', '.join(_ENGINE_OPTIONS)} for it")
        runtime = _build_runtime(model, state) if state.fallback_reason is None else None
        if runtime is None:
            raise RuntimeError(f"{type(model).__name__} cannot run on fastllm's paged runtime: "
                               f"{state.runtime_error or state.fallback_reason}")
        self.model, self.tokenizer, self.runtime = model, tokenizer, runtime
        self.runner = runtime.runner
        self.scheduler = Scheduler(
            self.runner.pool, max_num_seqs=engine_options.get("max_num_seqs", self.runner.max_num_seqs),
            max_num_batched_tokens=engine_options.get("max_num_batched_tokens", runtime.max_num_batched_tokens),
            max_model_len=self.runner.max_model_len,
            enable_prefix_caching=engine_options.get("enable_prefix_caching",
                                                     getattr(state.config, "enable_prefix_caching", False)))
        self.async_scheduling = bool(engine_options.get("async_scheduling",
                                                        getattr(state.config, "async_scheduling", True)))
        self._overlap = OverlappedSteps(self.scheduler, self.runner, lambda seq: seq.request.request_id)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._ids = itertools.count()
        self._sequences: dict[str, _Sequence] = {}
        self.num_generated_tokens = 0
        self.num_finished_requests = 0
        self.num_aborted_requests = 0
        self.num_steps = 0
        self.num_overlapped_steps = 0  # async scheduling: steps whose tokens the host did not wait for
        # Host seconds per phase of the step loop (the profile of where a step's time goes): scheduling,
        # preparing and launching the model step, sampling (which waits for the GPU), and the bookkeeping after.
        self.step_seconds: dict[str, float] = dict.fromkeys(("schedule", "execute", "sample", "update"), 0.0)
        self._ttft: deque[float] = deque(maxlen=MAX_METRIC_SAMPLES)
        self._tpot: deque[float] = deque(maxlen=MAX_METRIC_SAMPLES)

    @property
    def num_preemptions(self) -> int:
        """Requests preempted (blocks freed, recomputed later) since the engine was built."""
        return self.scheduler.num_preemptions

    # ---- public API --------------------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one `RequestOutput` per prompt, in input order.

        Args:
            prompts: a string, a list of strings, a list of token-id lists, or one token-id list.
            sampling_params: one `SamplingParams` for all prompts, or a list with one per prompt (a dict of
                SamplingParams fields also works; an invalid one aborts that request alone). Default:
                `SamplingParams()`.
            use_tqdm: show a progress bar over requests.

        Raises:
            ValueError: `sampling_params` is a list whose length differs from the number of prompts.
        """
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; pass one "
                                 f"SamplingParams or one per prompt")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        outputs = [self._add(prompt, params) for prompt, params in zip(prompts, params_list)]
        # Completions still running per request (an aborted request has none): the bar counts whole requests.
        pending = {id(o): 0 if o.error is not None else len(o.outputs) for o in outputs}
        bar = tqdm(total=len(outputs), desc="fastllm: generating", disable=not use_tqdm, leave=False)
        bar.update(sum(1 for n in pending.values() if n == 0))
        try:
            while self.has_work():
                for seq in self._step():
                    pending[id(seq.output)] -= 1
                    if pending[id(seq.output)] == 0:
                        bar.update(1)
        finally:
            self._overlap.drop()
            for rid in list(self._sequences):  # an exception or Ctrl-C: give every block back
                self.scheduler.abort(rid)
                self._complete(self._sequences[rid], time.perf_counter())
            bar.close()
        for out in outputs:
            self._record_metrics(out)
        return outputs

    def metrics(self) -> dict:
        """Engine counters: the scheduler's `stats()` (running / waiting requests, KV blocks used / free,
        preemptions, prefix-cache hits), plus generated tokens, finished / aborted requests, and TTFT / TPOT
        samples (seconds, one per finished request; the latest MAX_METRIC_SAMPLES) and histograms over them:
        counts per bucket with upper bounds `HISTOGRAM_BOUNDS` seconds, plus one open bucket; output tokens per
        second of the time spent stepping (`tokens_per_s`); and the step
        loop's profile: steps run and host seconds spent per phase (`step_seconds`: schedule, execute = prepare
        and launch, sample = wait for the GPU and pick tokens, update = bookkeeping).
        """
        return {
            **self.scheduler.stats(),
            "kv_blocks_total": self.runner.pool.num_blocks,
            "num_generated_tokens": self.num_generated_tokens,
            "num_finished_requests": self.num_finished_requests,
            "num_aborted_requests": self.num_aborted_requests,
            "time_to_first_token_s": list(self._ttft),
            "time_per_output_token_s": list(self._tpot),
            "histogram_bounds_s": list(HISTOGRAM_BOUNDS),
            "time_to_first_token_histogram": _histogram(self._ttft),
            "time_per_output_token_histogram": _histogram(self._tpot),
            # Output tokens per second of stepping (the engine's busy time; idle time between calls not counted).
            "tokens_per_s": self.num_generated_tokens / busy if (busy := sum(self.step_seconds.values())) else 0.0,
            "num_steps": self.num_steps,
            "num_overlapped_steps": self.num_overlapped_steps,
            "step_seconds": dict(self.step_seconds),
        }

    # ---- admission ---------------------------------------------------------------------------------------

    def _add(self, prompt, params) -> RequestOutput:
        """A RequestOutput for `prompt`, its completions queued; or, if it cannot run, aborted with `error`."""
        request_id = str(next(self._ids))
        out = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, None, [], True,
                            RequestMetrics(arrival_time=time.perf_counter()))
        added: list[str] = []
        try:
            if isinstance(params, dict):
                params = SamplingParams(**params)
            if not isinstance(params, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
            params.validate()
            out.prompt_token_ids = self._prompt_token_ids(prompt)
            needs_text = [name for name in ("stop", "bad_words") if getattr(params, name)]
            if needs_text and self.tokenizer is None:
                raise ValueError(f"{' and '.join(needs_text)} need a tokenizer: pass LLM(..., tokenizer=...)")
            bad_words = self._bad_words_token_ids(params.bad_words or [])
            eos = frozenset() if params.ignore_eos else self.eos_token_ids
            stop_ids = eos | frozenset(params.stop_token_ids or ())
            for index in range(params.n):
                rid = f"{request_id}:{index}"
                # max_tokens=None: the scheduler ends the request with "length" when the context is full.
                max_new = params.max_tokens if params.max_tokens is not None else self.runner.max_model_len
                req = Request(rid, out.prompt_token_ids, max_new_tokens=max_new,
                              min_new_tokens=params.min_tokens, eos_token_ids=stop_ids)
                self.scheduler.add(req)  # ValueError: empty prompt, longer than the context, ...
                added.append(rid)
                generator = None
                if params.seed is not None:
                    generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
                self._sequences[rid] = _Sequence(req, params, out, index, generator, bad_words, stop_ids,
                                                 [] if params.logprobs is not None else None)
                out.outputs.append(CompletionOutput(index, "", [], None))
        except (ValueError, TypeError) as error:  # TypeError: SamplingParams(**dict) with an unknown field
            for rid in added:
                self.scheduler.abort(rid)
                del self._sequences[rid]
            n = params.n if isinstance(params, SamplingParams) and isinstance(params.n, int) else 1
            out.outputs = [CompletionOutput(i, "", [], "abort") for i in range(max(n, 1))]  # one per completion
            out.error = f"{type(error).__name__}: {error}"
            out.metrics.finish_time = time.perf_counter()
            self.num_aborted_requests += 1
        return out

    def _prompt_token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer: pass LLM(..., tokenizer=...) or token ids")
            return list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            return list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        # Like vLLM: the word as given and with a leading space, since BPE vocabularies spell a word that
        # follows a space as a different token.
        sequences = []
        for word in words:
            for variant in (word, " " + word.lstrip()):
                ids = list(self.tokenizer(variant, add_special_tokens=False).input_ids)
                if ids and ids not in sequences:
                    sequences.append(ids)
        return sequences

    # ---- one step ----------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether a step remains: requests to schedule, or a step in flight whose tokens are unread."""
        return self.scheduler.has_unfinished() or self._overlap.inflight is not None

    def _step(self) -> list[_Sequence]:
        """Schedule, run and sample one step; returns the sequences that finished in it."""
        if self.async_scheduling:
            return self._step_async()
        start = time.perf_counter()
        step = self.scheduler.schedule()
        scheduled = time.perf_counter()
        logits = self.runner.execute(step.chunks)  # launches; replayed steps do not wait for the GPU
        launched = time.perf_counter()
        sampled = [self._sequences[c.request.request_id] for c in step.chunks if c.samples]
        result = sample_rows(logits, [seq.row() for seq in sampled])  # waits for the step's tokens
        sampled_at = time.perf_counter()
        done = self._apply(step, sampled, result)
        self._account_step(start, scheduled, launched, sampled_at)
        return done

    def _account_step(self, start: float, scheduled: float, launched: float, sampled: float) -> None:
        """Add one step's host seconds per phase; the update phase runs from `sampled` to now."""
        marks = (start, scheduled, launched, sampled, time.perf_counter())
        for phase, begin, end in zip(("schedule", "execute", "sample", "update"), marks, marks[1:]):
            self.step_seconds[phase] += end - begin
        self.num_steps += 1

    def _step_async(self) -> list[_Sequence]:
        """One step with the host a step ahead of the GPU (runtime/overlap.py): schedule and launch this step,
        then read the in-flight step's tokens, then sample this step without waiting for it. Returns the
        sequences that finished (by the in-flight step's tokens)."""
        start = time.perf_counter()
        output = self.scheduler.schedule() if self.scheduler.has_unfinished() else SchedulerOutput([], [])
        scheduled = time.perf_counter()
        logits = self._overlap.launch(output)
        launched = time.perf_counter()
        collected, token_ids = self._overlap.collect()
        done = self._after_tokens(collected, [None] * len(collected), time.perf_counter())
        resolved = time.perf_counter()
        if logits is not None:
            sampling = [self._sequences.get(c.request.request_id) for c in output.chunks if c.samples]
            logits, sampled = self._overlap.live_rows(logits, sampling, lambda seq: seq is not None)
            rows = [seq.row() for seq in sampled]
            if sampled and not any(needs_host_history(r) for r in rows):
                self._overlap.start(output, sampled, sample_tokens(logits, rows))
                self.num_overlapped_steps += 1
            else:  # rows that need the host: sample and apply now, as the synchronous loop does
                done += self._apply(output, sampled, sample_rows(logits, rows))
        self._account_step(start, scheduled, launched, resolved)
        return done

    def _apply(self, output: SchedulerOutput, sampled: list[_Sequence], result) -> list[_Sequence]:
        self.scheduler.update(output, {seq.request.request_id: t for seq, t in zip(sampled, result.token_ids)})
        return self._after_tokens(sampled, result.logprobs, time.perf_counter())

    def _after_tokens(self, sampled: list[_Sequence], logprobs: list, now: float) -> list[_Sequence]:
        """Bookkeeping once `sampled` got their new tokens: counts, TTFT, logprobs, stop strings, completion.
        Sequences completed before (aborted, or ended by the step before) are skipped."""
        done = []
        for seq, entry in zip(sampled, logprobs):
            if seq.request.request_id not in self._sequences:
                continue
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.logprobs is not None and entry is not None:
                seq.logprobs.append(entry)
            if not seq.request.is_finished and seq.params.stop and self._hit_stop_string(seq):
                self.scheduler.finish(seq.request, "stop")
            if seq.request.is_finished:
                self._complete(seq, now)
                done.append(seq)
        return done

    def _hit_stop_string(self, seq: _Sequence) -> bool:
        """Whether the text now holds a stop string; if so, keeps the text before the first one in `seq.text`."""
        tokens = seq.request.output_token_ids
        if len(tokens) < seq.params.min_tokens:
            return False
        # Only the tail can hold a new match (earlier ones stopped the request then): decode enough trailing
        # tokens for the longest stop string (a token is >= 1 character; 2 spare for partial characters).
        window = max(len(s) for s in seq.params.stop) + 2
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        if not any(s in tail for s in seq.params.stop):
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in seq.params.stop if s in text]
        if not cuts:
            return False
        seq.text = text[:min(cuts)]
        return True

    def _complete(self, seq: _Sequence, now: float) -> None:
        """Fill the completion's output from its finished request and forget the sequence."""
        req = seq.request
        del self._sequences[req.request_id]
        text = seq.text
        if text is None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True) if self.tokenizer else ""
        seq.output.outputs[seq.index] = CompletionOutput(seq.index, text, list(req.output_token_ids),
                                                         req.finish_reason, seq.logprobs)
        m = seq.output.metrics
        if seq.first_token_time is not None:
            m.first_token_time = min(m.first_token_time or seq.first_token_time, seq.first_token_time)
        m.finish_time = max(m.finish_time or now, now)
        m.num_generated_tokens += len(req.output_token_ids)

    def _record_metrics(self, out: RequestOutput) -> None:
        if out.error is not None:
            return
        if any(c.finish_reason == "abort" for c in out.outputs):
            self.num_aborted_requests += 1
            return
        self.num_finished_requests += 1
        # Per completion for TPOT: n completions decode in parallel, so the request's total would overcount.
        per_completion = out.metrics.num_generated_tokens / max(len(out.outputs), 1)
        m = RequestMetrics(out.metrics.arrival_time, out.metrics.first_token_time, out.metrics.finish_time,
                           round(per_completion))
        if m.time_to_first_token is not None:
            self._ttft.append(m.time_to_first_token)
        if m.time_per_output_token is not None:
            self._tpot.append(m.time_per_output_token)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one tokenized prompt
    return prompts


def _eos_ids(model, tokenizer) -> frozenset[int]:
    for eos in (model.generation_config.eos_token_id if model.generation_config is not None else None,
                model.config.eos_token_id, tokenizer.eos_token_id if tokenizer is not None else None):
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


def _histogram(values) -> list[int]:
    counts = [0] * (len(HISTOGRAM_BOUNDS) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(HISTOGRAM_BOUNDS) if v <= b), len(HISTOGRAM_BOUNDS))] += 1
    return counts
