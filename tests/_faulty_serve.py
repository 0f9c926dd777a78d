"""`fastllm serve` whose model step raises once for each sentinel prompt, for the server's fault test.

    python tests/_faulty_serve.py MODEL [serve options]

A step that runs a request whose prompt is `FAULT_AT_PREFILL` raises before that request has a token; one that runs
a request whose prompt is `FAULT_MID_STREAM` after it has `MID_STREAM_TOKENS` tokens raises then. Each fault fires
once. Nothing of this is in the product: the patch replaces `ModelRunner.execute` in the engine process only (the
server builds its engine through `fastllm.cli._build_served_llm`, which this script replaces by `_faulty_build`; the
engine process imports this module by name to run it).
"""

from __future__ import annotations

import sys
from pathlib import Path

FAULT_AT_PREFILL = [11, 12, 13, 14, 15, 16, 17, 18]
FAULT_MID_STREAM = [21, 22, 23, 24, 25, 26, 27, 28]
MID_STREAM_TOKENS = 3


def _install() -> None:
    from fastllm.runtime.model_runner import ModelRunner

    execute = ModelRunner.execute
    pending = {tuple(FAULT_AT_PREFILL): 0, tuple(FAULT_MID_STREAM): MID_STREAM_TOKENS}

    def faulty_execute(self, chunks, feed_rows=None):
        for chunk in chunks:
            after = pending.get(tuple(chunk.request.prompt_token_ids))
            if after is not None and len(chunk.request.output_token_ids) >= after:
                del pending[tuple(chunk.request.prompt_token_ids)]
                raise RuntimeError("injected fault in the model step")
        return execute(self, chunks, feed_rows)

    ModelRunner.execute = faulty_execute


def _faulty_build(*args, **kwargs):
    """In the engine process: the fault installed, then the server's own build."""
    from fastllm import cli

    _install()
    return cli._build_served_llm(*args, **kwargs)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastllm import cli
    from fastllm.cli import main

    cli._build_served_llm = _faulty_build

    sys.exit(main(["serve", *sys.argv[1:]]))
