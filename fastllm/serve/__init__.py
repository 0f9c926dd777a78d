"""`fastllm serve`: an HTTP server over one model's engine core (OpenAI-compatible and Triton/KServe v2 routes).

Built on FastAPI/Starlette and uvicorn (`pip install fastllm[serve]`); `app.build_app` makes the ASGI app.
"""
