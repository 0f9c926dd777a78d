"""`LLM`: the offline batch engine (vLLM's `LLM`), an entry point over the model's engine core.

    llm = fastllm.LLM("path/to/model")        # or LLM(hf_model, tokenizer=tok), optimized or not
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)

All prompts of a call go into the model's engine core at once (in-flight batching, chunked prefill, preemption when
the KV cache runs out); the sampler applies each request's own SamplingParams in the same step. A request that
cannot run (empty prompt, prompt longer than the context, invalid sampling values, ...) finishes alone with
`finish_reason="abort"` and an `error` message; the others complete. Several `LLM`s and `model.generate()` on one
model share its engine core: calls from several threads are batched together.

Stop strings follow vLLM: a completion ends as soon as its detokenized text contains one, and the returned text is
cut before the stop string (`token_ids` keep every generated token, including those that spelled it). EOS and
`stop_token_ids` tokens stay in `token_ids`; the text is decoded with `skip_special_tokens`.
"""

from __future__ import annotations

import json
import os
import time

import torch
from tqdm.auto import tqdm

from fastllm._log import logger
from fastllm._numbers import as_python_number
from fastllm.config import OptimizeConfig
from fastllm.entrypoints.model_state import model_eos_ids, optimize_in_place
from fastllm.quant.checkpoints import load_prequantized
from fastllm.runtime.engine_core import SCHEDULING_OPTIONS, CoreRequest
from fastllm.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastllm.runtime.sampling_params import SamplingParams


class LLM:
    """An offline batch engine over a Hugging Face causal LM.

    Args:
        model_or_path: a `PreTrainedModel` (optimized by `fastllm.optimize` or not: if not, it is optimized
            here with `**config`) or a local path / hub id loaded with `AutoModelForCausalLM`.
        tokenizer: a tokenizer or its path; default: loaded from `model_or_path` when that is a path. Needed
            for string prompts, text outputs, stop strings and bad words.
        dtype: weights dtype (a `torch.dtype`, its name such as "bfloat16", or "auto": the checkpoint's or the
            model's own) when loading from a path, or to convert a model to.
        device: device to load or move the model to.
        **config: `OptimizeConfig` fields (`num_kv_tokens`, `max_num_batched_tokens`, `max_num_seqs`, ...).
            An already-optimized model takes only the scheduling ones (`max_num_seqs`, `max_num_batched_tokens`,
            `enable_prefix_caching`, `async_scheduling`) and `kv_cache_memory_fraction`: this LLM's calls run with
            them (the model's engine core takes them while no other request runs on it).

    Like a server, an LLM reserves its KV cache when it is built: it grows the model's cache to its cap,
    `kv_cache_memory_fraction` of the card's total memory less what is in use (vLLM's convention), records its CUDA
    graphs, and logs what it took (`kv_cache_info` has the figures). `close()`, or leaving
    `with fastllm.LLM(...) as llm:`, gives it back. Scheduling defaults are sized from the card
    (`fastllm.config.scheduling_defaults`).

    Raises:
        RuntimeError: the model cannot run on fastllm's paged runtime (the message says why).
    """

    def __init__(self, model_or_path, *, tokenizer=None, dtype=None, device=None, **config) -> None:
        import transformers

        dtype = _as_dtype(dtype)
        if isinstance(model_or_path, (str, os.PathLike)) and _is_quantized_checkpoint(model_or_path):
            on_gpu = device is not None and torch.device(device).type == "cuda"
            fallback = torch.bfloat16 if on_gpu else torch.float32  # the CPU computes in fp32 (its reference dtype)
            model = load_prequantized(model_or_path, dtype=dtype if isinstance(dtype, torch.dtype) else fallback,
                                      device=device)
            device = None
            if tokenizer is None:
                tokenizer = _tokenizer_of(model_or_path)
        elif isinstance(model_or_path, (str, os.PathLike)):
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = transformers.AutoModelForCausalLM.from_pretrained(model_or_path, **kwargs).eval()
            if tokenizer is None:
                tokenizer = _tokenizer_of(model_or_path)
        else:
            model = model_or_path
            dtype = None if dtype == "auto" else dtype  # "auto": the model's own dtype, as from_pretrained reads it
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
        # Checked now: the first generate() would fail every request of its call from inside the step
        if tokenizer is not None and not (callable(tokenizer) and callable(getattr(tokenizer, "decode", None))):
            raise ValueError(f"tokenizer must be a Hugging Face tokenizer, its path, or None (token-id prompts only), "
                             f"got {type(tokenizer).__name__}")
        state = getattr(model, "_fastllm_state", None)
        self._owns_model = isinstance(model_or_path, (str, os.PathLike))
        fraction = None
        attached_here = state is None
        if state is None:
            if dtype is not None and not isinstance(model_or_path, (str, os.PathLike)):
                model = model.to(dtype=dtype)
            if device is not None:
                model = model.to(device)
            state = optimize_in_place(model, OptimizeConfig.resolve(None, config))
            options = {}
        else:
            options = {k: config.pop(k) for k in SCHEDULING_OPTIONS if k in config}
            checked = OptimizeConfig(**options)  # validated (numpy's numbers made Python's) as optimize() would
            options = {k: getattr(checked, k) for k in options}
            fraction = config.pop("kv_cache_memory_fraction", None)
            if fraction is not None:
                OptimizeConfig(kv_cache_memory_fraction=fraction)  # validated as optimize() would
            if config or dtype is not None or device is not None:
                given = sorted(config) + [k for k, v in (("dtype", dtype), ("device", device)) if v is not None]
                allowed = ", ".join((*SCHEDULING_OPTIONS, "kv_cache_memory_fraction"))
                raise ValueError(f"{type(model).__name__} is already optimized: {', '.join(given)} must be given to "
                                 f"fastllm.optimize(); LLM() only takes {allowed} for it")
        try:
            core = state.engine()
            if core is None:
                raise RuntimeError(f"{type(model).__name__} cannot run on fastllm's paged runtime: "
                                   f"{state.fallback_reason}")
            self.kv_cache_info = core.reserve(fraction)
            # Like a server, every CUDA graph is recorded now: a batch that shrinks as requests finish meets dozens
            # of decode sizes, and recording them on first use would happen inside the caller's timing.
            core.capture_graphs()
        except BaseException:
            if attached_here:  # an LLM that fails to start leaves the model it optimized as it was, not half-optimized
                state.release()
            raise
        self.model, self.tokenizer, self.core, self._state = model, tokenizer, core, state
        info = self.kv_cache_info
        logger.info("fastllm.LLM: KV cache of %s tokens (%.2f GiB) for %s", f"{info['tokens']:,}",
                    info["bytes"] / 2**30, type(model).__name__)
        # This LLM's scheduling settings: the model's, with the ones given here on top (validated now).
        defaults = {k: getattr(state.config, k) for k in SCHEDULING_OPTIONS}
        core.configure(**(defaults | options))
        self.engine_options = core.scheduling_options()  # as they run (capped at what the cache holds)
        self.vocab_size = core.vocab_size
        self.eos_token_ids = model_eos_ids(model) or _tokenizer_eos(tokenizer)

    def _open_core(self):
        if self.core is None:
            raise RuntimeError("this LLM was closed; build a new fastllm.LLM to generate again")
        if self.core.closed:
            # The model's engine core is shared: another LLM's close() (or fastllm.release()) closed it under this
            # one, whose calls then failed with errors about something else (a ValueError on max_num_seqs, an
            # IndexError from metrics()).
            raise RuntimeError("this LLM's engine core was closed (by close() of another LLM on the same model, or "
                               "fastllm.release()); build a new fastllm.LLM to generate again")
        return self.core

    @property
    def runner(self):
        return self._open_core().runner

    @property
    def scheduler(self):
        return self._open_core().scheduler

    @property
    def async_scheduling(self) -> bool:
        return self.engine_options["async_scheduling"]

    def has_work(self) -> bool:
        """Whether the model's engine core has requests (of any caller) or a step in flight; False once closed."""
        return self.core is not None and not self.core.closed and self.core.has_work()

    @property
    def num_preemptions(self) -> int:
        """Requests preempted (blocks freed, recomputed later) on this model's engine since it was built."""
        return self._open_core().scheduler.num_preemptions

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; returns one `RequestOutput` per prompt, in input order.

        Args:
            prompts: a string, a list of strings, a list of token-id lists, or one token-id list; a token-id list
                may be a 1-D integer tensor or numpy array (a 2-D one is refused: pass its rows without padding).
            sampling_params: one `SamplingParams` for all prompts, or a list with one per prompt (a dict of
                SamplingParams fields also works; an invalid one aborts that request alone). Default:
                `SamplingParams()`.
            use_tqdm: show a progress bar over requests.

        Raises:
            ValueError: `sampling_params` is a list whose length differs from the number of prompts; `prompts` is
                none of the forms above.
            RuntimeError: a model step failed (the message says why; every request of the call has ended).
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
        self._open_core().configure(**self.engine_options)
        bar = tqdm(total=len(prompts), desc="fastllm: generating", disable=not use_tqdm, leave=False)

        def listener(update) -> None:  # runs on whichever thread steps the core
            if update.finished:
                bar.update(1)

        outputs: list[RequestOutput] = []
        requests: list[CoreRequest] = []
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list)):
                request = self.add_request(prompt, params, listener=listener, index=index)
                if isinstance(request, RequestOutput):  # refused: already final
                    outputs.append(request)
                    bar.update(1)
                else:
                    requests.append(request)
                    outputs.append(request.output)
            self.core.run_until(lambda: all(r.finished for r in requests))
        finally:
            for r in requests:  # an exception or Ctrl-C: give every block back
                if not r.finished:
                    self.core.abort(r.request_id)
            bar.close()
        faults = [r for r in requests if r.fault is not None]
        if faults:
            raise RuntimeError(faults[0].output.error) from faults[0].fault
        return outputs

    def close(self) -> None:
        """Give back what this engine reserved: the model's engine core (KV cache, CUDA graphs, buffers) is freed,
        and a model this LLM loaded itself is released altogether. A model passed in stays optimized: its next
        generate() builds a small engine core again."""
        if self.core is None:
            return
        if self._owns_model:
            self._state.release()
        elif self._state.core is self.core:
            self._state.close_engine()
        self.core = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metrics(self) -> dict:
        """The counters of the model's engine core (see `EngineCore.metrics`): queues, KV blocks, tokens, latencies,
        step profile. Cumulative over every entry point on the model (LLMs, generate()) since its core was built."""
        return self._open_core().metrics()

    def add_request(self, prompt, params: SamplingParams | dict, *, listener=None, request_id: str | None = None,
                    index: int | None = None) -> CoreRequest | RequestOutput:
        """Queue one prompt on the engine core without running it (AsyncLLM and the server step the core).

        Returns the core's request (its `output` fills in as it runs), or, if it cannot run, a finished
        RequestOutput with `finish_reason="abort"` and an `error` saying why (naming the prompt's `index` if given).
        """
        core = self._open_core()
        try:
            if isinstance(params, dict):
                params = SamplingParams(**params)
            return core.add(self._prompt_token_ids(prompt), params,
                                 prompt=prompt if isinstance(prompt, str) else None, tokenizer=self.tokenizer,
                                 listener=listener, eos_token_ids=self.eos_token_ids, request_id=request_id)
        except (ValueError, TypeError) as error:  # TypeError: SamplingParams(**dict) with an unknown field
            n = params.n if isinstance(params, SamplingParams) and isinstance(params.n, int) else 1
            n = min(max(n, 1), 128)
            now = time.perf_counter()
            self.core.count_aborted()
            where = f"prompt {index}: " if index is not None else ""
            return RequestOutput(request_id or self.core.new_request_id(),
                                 prompt if isinstance(prompt, str) else None, None,
                                 [CompletionOutput(i, "", [], "abort") for i in range(n)], True,
                                 RequestMetrics(now, finish_time=now), error=f"{type(error).__name__}: {where}{error}")

    def _prompt_token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a string prompt needs a tokenizer: pass LLM(..., tokenizer=...) or token ids")
            return list(self.tokenizer(prompt).input_ids)
        ids = _array_token_ids(prompt)
        if ids is not None:
            return ids
        if isinstance(prompt, (list, tuple)):
            prompt = [as_python_number(t) for t in prompt]  # numpy's ints (a tokenizer's np output) as Python's
            # One entry named: "got list" told the caller nothing about which of its ids was wrong
            bad = next(((i, t) for i, t in enumerate(prompt) if not isinstance(t, int) or isinstance(t, bool)), None)
            if bad is None:
                return list(prompt)
            raise ValueError(f"a prompt's token ids must be ints; position {bad[0]}: {bad[1]!r} "
                             f"({type(bad[1]).__name__})")
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _tokenizer_of(path):
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # token-id prompts still work; string prompts say what is missing
    # transformers 5 builds an empty tokenizer (one special token) for a folder without tokenizer files instead of
    # raising; it would decode every output to "".
    return tokenizer if len(tokenizer) > 1 else None


def _as_dtype(dtype):
    """LLM's `dtype`: None, "auto" or a torch.dtype as given, a dtype's name ("bfloat16") as that torch.dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    # A model object met nn.Module.to's TypeError, a path an AttributeError from transformers, neither naming dtype
    raise ValueError(f"dtype must be a torch.dtype, 'auto' or a dtype's name ('bfloat16', 'float16', 'float32'), "
                     f"got {dtype!r}")


def _tokenizer_eos(tokenizer) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return frozenset() if eos is None else frozenset([eos])


def _array_token_ids(prompt) -> list[int] | None:
    """One prompt's token ids from a 1-D integer torch tensor or numpy array (a tokenizer's return_tensors output, one
    row of it); None for anything else. Each was read as a list of one-token prompts, or refused as "got Tensor". A
    2-D one is refused: its rows may hold padding, which would become prompt tokens."""
    if not (isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy" and hasattr(prompt, "ndim")):
        return None
    integer = not (prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool) \
        if isinstance(prompt, torch.Tensor) else prompt.dtype.kind in "iu"
    if not integer or prompt.ndim != 1:
        raise ValueError(f"a prompt given as an array must be 1-D token ids of an integer dtype, got shape "
                         f"{tuple(prompt.shape)} of {prompt.dtype}; for a batch pass a list of its rows without their "
                         f"padding (e.g. [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)])")
    return [int(t) for t in prompt.tolist()]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if _array_token_ids(prompts) is not None:  # one prompt's ids as a 1-D array (2-D: refused, saying why)
        return [prompts]
    try:
        prompts = list(prompts)
    except TypeError:  # None or a number: list()'s "object is not iterable" named neither the argument nor its forms
        raise ValueError(f"prompts must be a string, a list of strings or of token-id lists, or one token-id list; "
                         f"got {type(prompts).__name__}") from None
    if prompts and all(isinstance(as_python_number(t), int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one tokenized prompt
    return prompts



def _is_quantized_checkpoint(path) -> bool:
    """Whether a model folder's config declares a quantization (loaded by `fastllm.quant.load_prequantized`)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        return json.load(f).get("quantization_config") is not None
