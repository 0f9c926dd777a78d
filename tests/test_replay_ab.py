"""benchmarks/replay_ab.py's --setting variants: parsed into (module, attribute, value), applied for the variant's
optimize() and restored after, bad text refused with the form it wants."""

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
replay_ab = importlib.import_module("replay_ab")

MODULE = "fastllm.kernels.paged_attention"


def test_parse_setting():
    assert replay_ab.parse_setting(f"t4={MODULE}._MIN_TILES_PER_SPLIT=4,{MODULE}._DECODE_BLOCK_N=128") == (
        "t4", [(MODULE, "_MIN_TILES_PER_SPLIT", 4), (MODULE, "_DECODE_BLOCK_N", 128)], ())
    # '+PASS' items add opt-in passes to the variant
    assert replay_ab.parse_setting("fused=+decode_fusion,fastllm.passes.decode_fusion.NORM_PROLOGUE='x'") == (
        "fused", [("fastllm.passes.decode_fusion", "NORM_PROLOGUE", "x")], ("decode_fusion",))
    assert replay_ab.parse_setting(f"off={MODULE}.COMBINE_IN_DECODE_KERNEL=False")[1][0][2] is False
    for bad in ["t4", "t4=", f"t4={MODULE}._MIN_TILES_PER_SPLIT", "t4=_MIN_TILES_PER_SPLIT=4"]:
        with pytest.raises(ValueError, match="module.ATTR=VALUE"):
            replay_ab.parse_setting(bad)


def test_applied_restores():
    module = importlib.import_module(MODULE)
    before = module._MIN_TILES_PER_SPLIT
    with replay_ab.applied([(MODULE, "_MIN_TILES_PER_SPLIT", before + 3)]):
        assert module._MIN_TILES_PER_SPLIT == before + 3
    assert module._MIN_TILES_PER_SPLIT == before
    with pytest.raises(AttributeError):  # a misspelt attribute is not silently added
        with replay_ab.applied([(MODULE, "_MIN_TILES_PER_SPLIT", 9), (MODULE, "_NO_SUCH_SETTING", 1)]):
            pass
    assert module._MIN_TILES_PER_SPLIT == before


def test_a_setting_that_launch_settings_derive_from_takes_effect():
    """The skinny GEMM caches its launch settings by shape: a variant setting the programs an SM its K splits aim at
    gets settings worked out under it (not the default's, cached by an earlier round), and the default's after."""
    import torch

    from fastllm.kernels import skinny_gemm

    cpu = torch.device("cpu")
    default = skinny_gemm._config(1, 256, 4096, torch.float16, cpu)  # cached under the default
    with replay_ab.applied([("fastllm.kernels.skinny_gemm", "_PROGRAMS_PER_SM", 4 * skinny_gemm._PROGRAMS_PER_SM)]):
        assert skinny_gemm._config(1, 256, 4096, torch.float16, cpu)["split_k"] > default["split_k"]
    assert skinny_gemm._config(1, 256, 4096, torch.float16, cpu) == default
