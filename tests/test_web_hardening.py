"""Issue 27's probes against a whole bot (``App.start``, web chat on its default loopback bind,
no keys) over real HTTP. The checks under test sit in front of the model, so the engine is the
OpenAI-compatible backend (``[engine] backend = "openai"``) on a scripted server here, which
answers at once: no model runs and the tests take seconds, not minutes."""

from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from served import rows, serving

ASYNC = pytest.mark.asyncio(loop_scope="module")
REPLY = ["臣妾", "在。"]


class ScriptedServer:
    """An OpenAI-compatible completions server that streams REPLY to every prompt."""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in REPLY:
            chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})


def config(model_url: str, base: str, extra: str = "") -> str:
    return f"""
[model]
base = "{base}"

[engine]
backend = "openai"
base_url = "{model_url}"
api_key_env = "ROLEBOT_TEST_HARDENING_NO_KEY"
timeout = 10

[canon]
k = 0

[web]
port = 0

[service]
rate_limit_per_minute = 1000
{extra}
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def model_url():
    scripted = ScriptedServer()
    app = web.Application()
    app.router.add_post("/v1/completions", scripted.completions)
    app.router.add_get("/v1/models", scripted.models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site(tmp_path_factory, model_url):
    root = tmp_path_factory.mktemp("hardening")
    async with serving(root, config(model_url, str(root / "no-local-model"))) as (app, url):
        yield app, url


async def post(url: str, path: str, body, *, headers: dict | None = None) -> tuple[int, dict]:
    """POST ``body`` (a dict is sent as JSON text) with exactly the headers given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as http:
        async with http.post(url + path, data=data, headers=headers or {"Content-Type": "application/json"}) as response:
            return response.status, await response.json(content_type=None)


def chat(text: str, user: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "user": user, **extra}


# Item 3: numbers too large for a float.


@ASYNC
async def test_huge_numbers_in_sampling_fields_are_a_400_naming_the_field(site):
    app, url = site
    huge = 10**400
    for field, value in (("max_tokens", huge), ("max_completion_tokens", huge), ("temperature", huge),
                         ("top_p", huge), ("max_tokens", -huge), ("temperature", -huge)):
        status, body = await post(url, "/v1/chat/completions", chat("你好", "numbers", **{field: value}))
        assert status == 400, (field, value, body)
        error = body["error"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", field, "invalid_request")
        assert error["message"].startswith(f"{field} must be") and len(error["message"]) < 200, error
    assert not rows(app, "SELECT 1 FROM messages m JOIN users u ON u.id = m.user_id "
                         "WHERE u.platform_user_id = 'numbers'")
    for field, value in (("max_tokens", 2**31), ("top_p", 1 + 10**-9), ("temperature", 2.5)):
        status, body = await post(url, "/v1/chat/completions", chat("你好", "numbers", **{field: value}))
        assert status == 400 and body["error"]["param"] == field, (field, body)
    # A large value within the bounds is capped to [generation] max_new_tokens, as before.
    status, body = await post(url, "/v1/chat/completions", chat("你好", "numbers", max_tokens=10**6))
    assert status == 200 and body["choices"][0]["message"]["content"] == "臣妾在。"
