"""Schemathesis hooks for the server's schema fuzz (tests/test_serve_hardening.py), loaded through
SCHEMATHESIS_HOOKS in the `st run` process.

Generated requests name a random model, which the server answers 404 before anything else runs; half of them are
given the served model's name instead (in the body's "model", or in a path parameter named like one: the Triton
routes' `/v2/models/{...}`), so the fuzz also reaches tokenization, sampling validation and the engine.
"""

import os

import schemathesis
from hypothesis import strategies as st

MODEL = os.environ.get("FASTLLM_FUZZ_MODEL", "tiny")


@schemathesis.hook
def flatmap_body(context, body):
    if isinstance(body, dict) and "model" in body:
        return st.sampled_from([body, {**body, "model": MODEL}])
    return st.just(body)


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    names = [name for name in path_parameters or {} if "model" in name.lower()]
    if not names:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **dict.fromkeys(names, MODEL)}])
