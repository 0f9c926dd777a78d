"""Triton / KServe v2 routes, with the TensorRT-LLM backend's names (`text_input`, `max_tokens`, `bad_words`,
`stop_words`, ... -> `text_output`): generate, generate_stream, infer (JSON and binary tensors), health, metadata."""

from __future__ import annotations

from fastapi import APIRouter, Request

from fastllm.serve.server_state import ServerState

router = APIRouter()


@router.get("/v2/health/live")
async def live():
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request):
    state: ServerState = request.app.state.fastllm
    return {"ready": state.serving.engine is not None}
