"""An OpenAI-compatible server on loopback for the OpenAI backend's tests: /v1/completions
streamed as SSE in the pieces given, /v1/models, and vLLM's /v1/load_lora_adapter."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

from aiohttp import web


class FakeServer:
    """Serves `reply` in pieces (with a stop string in the middle) and records each request."""

    def __init__(self, pieces: list[str], delay: float = 0.0):
        self.pieces = pieces
        self.delay = delay
        self.requests: list[dict] = []
        self.served = {"v0001"}
        self.fail = False

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        body["authorization"] = request.headers.get("Authorization")
        self.requests.append(body)
        if self.fail:
            return web.json_response({"error": {"message": "model crashed", "type": "server_error"}}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in self.pieces:
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(self.delay)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                               "owned_by": "vllm"} for m in sorted(self.served)]})

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.served.add(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")


@asynccontextmanager
async def serving(fake: FakeServer):
    """``fake`` on a free loopback port; ``fake.url`` is its /v1 prefix."""
    app = web.Application()
    app.router.add_post("/v1/completions", fake.completions)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/load_lora_adapter", fake.load_lora)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()
