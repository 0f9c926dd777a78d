"""User-facing configuration dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Every fusion pass `optimize()` knows, in the order it runs them. The MLP pass runs before the QKV pass
# because gate/up projections also share an input: they must become one gate_up GEMM with a fused
# activation, not a plain merged linear.
ALL_PASSES: tuple[str, ...] = ("dropout", "rms_norm", "layer_norm", "rotary", "gated_mlp", "qkv")

ON_CAPTURE_FAILURE = ("fallback", "raise")


@dataclass
class OptimizeConfig:
    """How `fastllm.optimize()` transforms a model.

    Args:
        passes: names of the fusion passes to run (default: all of `ALL_PASSES`). What no pass matches
            still runs, unfused and correct.
        on_capture_failure: "fallback" warns once and keeps the model running unoptimized (correct);
            "raise" re-raises the capture error (useful when adding support for a new architecture).
        warmup: capture at `optimize()` time with a short generation, so capture errors surface and the
            merged weights are built there, not on the user's first real call.
        dynamic: forwarded to `torch.compile(dynamic=...)`. True (default) captures symbolic sizes from
            the start, so prompt and cache lengths never trigger a recapture (dynamo still specializes
            sizes of 1, which the warm-up covers by generating for a batch of 1 and of 2). None lets dynamo
            recapture on the first change of a size instead.
    """

    passes: tuple[str, ...] = field(default=ALL_PASSES)
    on_capture_failure: str = "fallback"
    warmup: bool = True
    dynamic: bool | None = True

    def __post_init__(self) -> None:
        if isinstance(self.passes, str):
            raise ValueError(f"passes must be a sequence of pass names, got the string {self.passes!r}; "
                             f"allowed names: {', '.join(ALL_PASSES)}")
        self.passes = tuple(self.passes)
        unknown = [p for p in self.passes if p not in ALL_PASSES]
        if unknown:
            raise ValueError(f"unknown pass name(s) {unknown}; allowed: {', '.join(ALL_PASSES)}")
        if self.on_capture_failure not in ON_CAPTURE_FAILURE:
            raise ValueError(f"on_capture_failure must be one of {ON_CAPTURE_FAILURE}, "
                             f"got {self.on_capture_failure!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"warmup must be True or False, got {self.warmup!r}")
        if self.dynamic not in (None, True, False):
            raise ValueError(f"dynamic must be None, True or False, got {self.dynamic!r}")

    @classmethod
    def resolve(cls, config: OptimizeConfig | None, overrides: dict[str, Any]) -> OptimizeConfig:
        """Combine an optional config with keyword overrides (`optimize(model, warmup=False)`)."""
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a fastllm.OptimizeConfig, got {type(config).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for fastllm.optimize(); "
                            f"allowed: {', '.join(allowed)}")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **overrides)
