"""A scripted OpenAI-compatible chat server on loopback (/v1/chat/completions): answers in
order from a script, then from a function of the prompt; errors, raw bodies and delays on
demand; every request recorded. For the tests of augmentation and the novel extractor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web


@dataclass
class Reply:
    """One scripted answer: a chat completion with ``content``, an error ``status``, or a raw
    ``body``; sent after ``delay`` seconds."""

    content: str = ""
    status: int = 200
    body: str | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    at: float
    authorization: str
    body: dict

    @property
    def prompt(self) -> str:
        return self.body["messages"][-1]["content"]


class FakeLLM:
    """Answers POST /v1/chat/completions from ``script`` in order, then with ``answer(prompt)``."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.answer: Callable[[str], Reply] = lambda prompt: Reply("[]")
        self.requests: list[Request] = []
        self.answered = 0
        self.inflight = self.max_inflight = 0
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Request(time.monotonic(), request.headers.get("Authorization", ""), body))
        reply = self.script.popleft() if self.script else self.answer(body["messages"][-1]["content"])
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(reply.delay)
        finally:
            self.inflight -= 1
        self.answered += 1
        if reply.body is not None:
            return web.Response(text=reply.body, content_type="application/json")
        if reply.status != 200:
            error = {"error": {"message": f"scripted {reply.status}", "type": "server_error", "code": None}}
            return web.json_response(error, status=reply.status, headers=reply.headers)
        return web.json_response({
            "id": f"c{len(self.requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.content}, "finish_reason": "stop"}],
            # A character a token: enough for the tests that count what a run spent.
            "usage": {"prompt_tokens": len(body["messages"][-1]["content"]), "completion_tokens": len(reply.content),
                      "total_tokens": len(body["messages"][-1]["content"]) + len(reply.content)},
        })


@pytest.fixture
def llm():
    """The fake server on its own event loop in a thread, so the command's asyncio.run works."""
    fake = FakeLLM()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield fake
    async def stop() -> None:
        await runner.cleanup()
        # A reply still sleeping past the client's timeout is of no use to anyone now.
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
