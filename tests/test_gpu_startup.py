"""A second process starting the same model loads the captured graph from the graph cache, whichever way the model
was built: issue 11 saw the H200 miss it for `LlamaForCausalLM(config)` built under `torch.set_default_dtype`,
followed by a 128-token and a 2048-token generate (the project's own start-up benchmark, built with `from_config`,
hit). Each start is a real new process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[1]

# The Llama-3.1-8B widths, two layers: the shapes of the report, without 15 GiB of weights per process.
START = """
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
import fastllm

built = sys.argv[1]
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                     eos_token_id=None, bos_token_id=None, pad_token_id=0)
torch.manual_seed(0)
start = time.perf_counter()
if built == "default_dtype":
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
else:
    from transformers import AutoModelForCausalLM
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
fastllm.optimize(model)
for length in (128, 2048):
    ids = torch.randint(1, 128256, (1, length), generator=torch.Generator().manual_seed(length)).cuda()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
torch.cuda.synchronize()
report = fastllm.explain(model)
print(json.dumps({"from_graph_cache": report.startup["graph_from_cache"], "seconds": time.perf_counter() - start}))
"""


def _start(built: str, cache: Path) -> dict:
    env = {**os.environ, "FASTLLM_GRAPH_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", START, built], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("built", ["default_dtype", "from_config"])
def test_a_second_process_loads_the_graph_from_the_cache(built, tmp_path):
    first = _start(built, tmp_path / "graphs")
    second = _start(built, tmp_path / "graphs")
    print(f"{built}: first start {first}, second start {second}")
    assert not first["from_graph_cache"]
    assert second["from_graph_cache"], "the second process traced again: the graph cache missed"
