"""Issue 27's probes against a whole bot (``App.start``, web chat on its default loopback bind,
no keys) over real HTTP. The checks under test sit in front of the model, so the engine is the
OpenAI-compatible backend (``[engine] backend = "openai"``) on a scripted server here, which
answers at once: no model runs and the tests take seconds, not minutes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bot.cli import main
from bot.platforms.web_auth import COOKIE, Authenticator, load_secret
from served import rows, serving

ASYNC = pytest.mark.asyncio(loop_scope="module")
REPLY = ["臣妾", "在。"]
TOKEN_ENV = "ROLEBOT_TEST_HARDENING_ADMIN_TOKEN"
TOKEN = "admin-token-hardening-0123456789"


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


def config(model_url: str, base: str, web: str = "") -> str:
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
{web}

[service]
rate_limit_per_minute = 1000
admin_token_env = "{TOKEN_ENV}"
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
    os.environ[TOKEN_ENV] = TOKEN
    try:
        async with serving(root, config(model_url, str(root / "no-local-model"))) as (app, url):
            yield app, url
    finally:
        del os.environ[TOKEN_ENV]


async def post(url: str, path: str, body, *, headers: dict | None = None) -> tuple[int, dict]:
    """POST ``body`` (a dict is sent as JSON text) with exactly the headers given."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as http:
        async with http.post(url + path, data=data, headers={"Content-Type": "application/json"} if headers is None else headers) as response:
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


# Item 1: cross-site requests (CSRF) on the keyless loopback default.


async def said_and_rated(url: str, user: str) -> dict:
    """A conversation of ``user``'s with one reply, rated 👍; the reply's body."""
    status, reply = await post(url, "/v1/chat/completions", chat("记住我", user))
    assert status == 200, reply
    status, body = await post(url, "/api/ratings", {"message_id": int(reply["id"]), "user": user, "value": 1})
    assert status == 200, body
    return reply


def history(app, user: str) -> list[tuple]:
    """Every message of ``user``'s chat (all conversations) with its rating."""
    return [tuple(r) for r in rows(app, "SELECT m.id, m.role, m.text, r.value FROM messages m JOIN conversations c "
                                        "ON c.id = m.conversation_id LEFT JOIN ratings r ON r.message_id = m.id "
                                        "WHERE c.platform = 'web' AND c.chat_id = ? ORDER BY m.id", user)]


@ASYNC
async def test_a_foreign_page_cannot_drive_the_open_local_api(site):
    app, url = site
    reply = await said_and_rated(url, "alice2")
    before = history(app, "alice2")
    evil = {"Content-Type": "text/plain", "Origin": "http://evil.example"}  # what a form on any page sends
    json_from = lambda origin, **more: {"Content-Type": "application/json", "Origin": origin, **more}  # noqa: E731
    forget = chat("/forget", "alice2")
    probes = [
        ("/v1/chat/completions", forget, evil, 403),  # the probe
        ("/v1/chat/completions", forget, json_from("http://evil.example"), 403),
        ("/v1/chat/completions", forget, json_from("null"), 403),  # a sandboxed frame, a file:// page
        # Another port of this machine is the same site (its cookies go along), not the same origin.
        ("/v1/chat/completions", forget, json_from("http://localhost:3000", **{"Sec-Fetch-Site": "same-site"}), 403),
        ("/v1/chat/completions", forget, {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
        ("/v1/chat/completions", forget, {"Content-Type": "text/plain"}, 415),  # no Origin: JSON is still required
        ("/v1/chat/completions", forget, {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ("/v1/chat/completions", forget, {}, 415),
        ("/api/ratings", {"message_id": int(reply["id"]), "user": "alice2", "value": -1}, evil, 403),
        ("/api/ratings", {"message_id": int(reply["id"]), "user": "alice2", "value": -1}, {"Content-Type": "text/plain"}, 415),
        ("/api/keep", {"message_id": int(reply["id"]), "user": "alice2"}, evil, 403),
        ("/api/stop", {"user": "alice2"}, evil, 403),
        ("/api/stop", b"", {"Origin": "http://evil.example"}, 403),  # no body at all
        ("/api/admin/rollback", b"", {"Origin": "http://evil.example"}, 403),
    ]
    for path, body, headers, expected in probes:
        status, answer = await post(url, path, body, headers=headers)
        assert status == expected, (path, headers, answer)
        code = {403: "cross_site_request", 415: "unsupported_media_type"}[expected]
        assert answer["error"]["code"] == code and answer["error"]["type"] == "invalid_request_error", answer
        assert path in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    # A page elsewhere cannot read, nor greet into, someone's conversation (an <img> or fetch).
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/api/conversation", params={"user": "alice2"},
                            headers={"Sec-Fetch-Site": "cross-site"}) as response:
            assert response.status == 403
    assert history(app, "alice2") == before  # alice2's messages and 👍 are all still there


@ASYNC
async def test_the_chat_pages_own_requests_and_local_tools_still_pass(site):
    app, url = site
    jar = aiohttp.CookieJar(unsafe=True)
    page = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        # A link from another site opens the page (a cross-site navigation is no request to act on).
        async with http.get(url + "/", headers={"Sec-Fetch-Site": "cross-site"}) as response:
            assert response.status == 200
        async with http.get(url + "/api/conversation", headers={"Sec-Fetch-Site": "same-origin"}) as response:
            assert response.status == 200
        async with http.post(url + "/v1/chat/completions", json=chat("网页来客", "ignored"), headers=page) as response:
            assert response.status == 200
            reply = await response.json()
        async with http.post(url + "/api/ratings", data=json.dumps({"message_id": int(reply["id"]), "value": 1}),
                             headers={**page, "Content-Type": "application/json; charset=utf-8"}) as response:
            assert response.status == 200, await response.text()
        async with http.post(url + "/api/stop", json={}, headers=page) as response:
            assert response.status == 200 and await response.json() == {"stopped": False}
    [user] = rows(app, "SELECT u.platform_user_id FROM messages m JOIN users u ON u.id = m.user_id WHERE m.id = ?",
                  reply["rolebot"]["user_message_id"])
    assert user[0].startswith("web-")  # the page's session, not the user field
    # A tool on this machine sends no Origin and no Sec-Fetch-Site: JSON is all it needs.
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0)
    done = await client.chat.completions.create(model="甄嬛", messages=[{"role": "user", "content": "你好"}], user="tool")
    assert done.choices[0].message.content == "臣妾在。"
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/stop", params={"user": "tool"}) as response:  # no body: nothing to type
            assert response.status == 200


# Item 2: DNS rebinding.


@ASYNC
async def test_a_name_that_is_not_loopback_is_refused_on_the_loopback_bind(site):
    app, url = site
    port = int(url.rsplit(":", 1)[1])
    await said_and_rated(url, "alice3")
    async with aiohttp.ClientSession() as http:
        for host in ("attacker.example:18080", "attacker.example", f"127.0.0.1.nip.io:{port}", f"0.0.0.0:{port}"):
            for method, path in (("GET", "/api/conversation?user=alice3"), ("GET", "/"), ("POST", "/v1/chat/completions")):
                async with http.request(method, url + path, headers={"Host": host, "Content-Type": "application/json"},
                                        data=json.dumps(chat("/forget", "alice3"))) as response:
                    assert response.status == 421, (host, path)
                    error = (await response.json())["error"]
                    assert error["code"] == "misdirected_request" and "[web] allowed_hosts" in error["message"], error
                    assert "alice3" not in await response.text()
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", f"chat.localhost:{port}",
                     "localhost.localdomain", f"127.0.0.2:{port}"):
            async with http.get(url + "/api/conversation?user=alice3", headers={"Host": host}) as response:
                assert response.status == 200, host
                assert (await response.json())["turns"][0]["text"] == "记住我"
    assert len(history(app, "alice3")) == 2


@ASYNC
async def test_allowed_hosts_names_the_server_behind_a_proxy(tmp_path, model_url):
    text = config(model_url, str(tmp_path / "no-local-model"), 'allowed_hosts = ["chat.example.org", "bot.example:8443"]')
    async with serving(tmp_path, text) as (app, url):
        async with aiohttp.ClientSession() as http:
            for host, status in (("chat.example.org", 200), ("CHAT.example.org:443", 200), ("bot.example:8443", 200),
                                 ("bot.example", 421), ("other.example.org", 421), ("localhost", 200)):
                async with http.get(url + "/api/conversation", headers={"Host": host}) as response:
                    assert response.status == status, host
            # A proxy that passes its own Host on: the page's Origin is the public name.
            async with http.post(url + "/v1/chat/completions", json=chat("你好", "proxied"),
                                 headers={"Origin": "https://chat.example.org", "Sec-Fetch-Site": "same-origin"}) as response:
                assert response.status == 200
            async with http.post(url + "/v1/chat/completions", json=chat("你好", "proxied"),
                                 headers={"Origin": "https://evil.example.org"}) as response:
                assert response.status == 403


def test_hosts_are_split_and_allowed_hosts_must_be_names():
    from bot.platforms.web_guard import Guard, split_host
    from training.errors import UserError

    assert [split_host(h) for h in ("127.0.0.1:8080", "[::1]:8080", "::1", "LocalHost.", "a.example:x")] == [
        ("127.0.0.1", 8080), ("::1", 8080), ("::1", None), ("localhost", None), ("a.example", None)]
    for entry in ("http://chat.example.org/", "chat.example.org/path", " "):
        with pytest.raises(UserError, match=r"\[web\] allowed_hosts: .* is not a host name"):
            Guard(loopback_bind=True, allowed_hosts=[entry])
    anywhere = Guard(loopback_bind=True, allowed_hosts=["*"])
    assert anywhere.host("attacker.example") is None  # '*' turns the check off, knowingly
    assert Guard(loopback_bind=False).host("any.example") is None  # keys guard a public bind
    assert Guard(loopback_bind=False, allowed_hosts=["bot.example"]).host("any.example")


# Item 5: logs.


@ASYNC
async def test_malformed_requests_are_one_line_without_the_credentials_they_carried(site, caplog):
    app, url = site
    caplog.set_level(logging.DEBUG)
    where = urlsplit(url)
    probes = [
        b"GET /api/admin/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() + b"\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: rolebot_session=web-abc.secretsignature\x01\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # a line too long
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32 + b"\r\n\r\n",  # TLS on the HTTP port
    ] + [b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Api: Bearer " + TOKEN.encode() + b"\x7f\r\n\r\n"] * 6
    for raw in probes:
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n", 1)[0], answer[:200]
    await asyncio.sleep(0.1)
    assert TOKEN not in caplog.text and "secretsignature" not in caplog.text, caplog.text
    server = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(server) == 1, [r.getMessage() for r in server]  # one line for all ten
    web_chat = next(f for f in app.frontends if f.name == "web")
    assert web_chat._logs.malformed.skipped == len(probes) - 1  # the others are counted for the next line
    [line] = server
    assert line.levelno == logging.WARNING and line.exc_info is None and "\n" not in line.getMessage()
    assert "malformed HTTP request from 127.0.0.1" in line.getMessage(), line.getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    async with aiohttp.ClientSession() as http:  # and the server goes on
        async with http.get(url + "/api/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200


def test_the_malformed_request_line_comes_once_a_minute_and_counts_the_rest():
    from aiohttp.http_exceptions import BadHttpMessage

    from bot.logs import MalformedRequests

    now = [1000.0]
    quiet = MalformedRequests(every_s=60.0, clock=lambda: now[0])

    def record(reason: str) -> logging.LogRecord:
        try:
            raise BadHttpMessage(reason)
        except BadHttpMessage:
            import sys

            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                     ("10.0.0.7",), sys.exc_info())

    first = record("Invalid header value char:\n\n  b'Authorization: Bearer sk-secret\\x00'")
    assert quiet.filter(first) and first.exc_info is None and first.levelno == logging.WARNING
    assert first.getMessage().startswith("web: refused a malformed HTTP request from 10.0.0.7 (400: Invalid "
                                         "header value char)") and "sk-secret" not in first.getMessage()
    now[0] += 10
    assert not any(quiet.filter(record("Bad method")) for _ in range(5))
    now[0] += 51
    again = record("Bad method")
    assert quiet.filter(again) and "5 more in the 61 s before it were not logged" in again.getMessage()
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", (), None)
    assert quiet.filter(other) and other.levelno == logging.ERROR  # what is not a malformed request is left alone


def test_credentials_are_redacted_from_every_log_line_and_traceback():
    import io

    from bot.logs import Redact, keep_secret

    keep_secret("sk-registered-0123456789")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(Redact())
    logger = logging.getLogger("rolebot.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("got %s", "Authorization: Bearer sk-live-abcdef0123456789")
        logger.warning("cookie header was Cookie: rolebot_session=web-x.sig; other=1")
        logger.warning("a key in a URL /bot%s/getMe", "sk-registered-0123456789")
        logger.warning("basic rules: the bearer of news keeps its words")
        try:
            raise ValueError("header b'Authorization: Basic dXNlcjpwYXNz\\x00'")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    for secret in ("sk-live-abcdef0123456789", "web-x.sig", "sk-registered-0123456789", "dXNlcjpwYXNz"):
        assert secret not in text, text
    assert text.count("[redacted]") >= 4 and "Traceback" in text and "ValueError" in text
    assert "basic rules: the bearer of news keeps its words" in text  # ordinary words stay


# Item 8: page sessions last [web] session_days after their last use, can be revoked, and are
# Secure behind a TLS proxy.

DAYS_30 = str(30 * 86400)


def page_cookie(response: aiohttp.ClientResponse):
    """The session cookie a response sets (a Morsel), or None."""
    return response.cookies.get(COOKIE)


async def new_browser(url: str, headers: dict | None = None):
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url + "/", headers=headers or {}) as response:
            assert response.status == 200
            return page_cookie(response)


async def with_cookie(url: str, cookie: str, method: str = "GET", path: str = "/api/conversation", **kwargs):
    """(status, body or None, the cookie the answer sets or None) of a request carrying ``cookie``."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.request(method, url + path, headers={"Cookie": f"{COOKIE}={cookie}"}, **kwargs) as response:
            body = await response.read()
            data = json.loads(body) if response.content_type == "application/json" else None
            return response.status, data, page_cookie(response)


@ASYNC
async def test_the_session_cookie_lasts_30_days_and_is_secure_behind_tls(site):
    _, url = site
    cookie = await new_browser(url)
    assert cookie["max-age"] == DAYS_30 and cookie["httponly"] and cookie["samesite"] == "Strict"  # was 400 days
    assert not cookie["secure"]  # plain http on loopback: a Secure cookie would never come back
    # A TLS proxy in front says so; Secure then (only ever a stricter cookie, whoever sends it).
    for proto in ("https", "https, http", "HTTPS"):
        assert (await new_browser(url, {"X-Forwarded-Proto": proto}))["secure"], proto
    assert not (await new_browser(url, {"X-Forwarded-Proto": "http"}))["secure"]


@ASYNC
async def test_secure_cookies_and_session_days_are_settings(tmp_path, model_url):
    text = config(model_url, str(tmp_path / "no-local-model"), "secure_cookies = true\nsession_days = 7")
    async with serving(tmp_path, text) as (app, url):
        cookie = await new_browser(url)
        assert cookie["secure"] and cookie["max-age"] == str(7 * 86400)


@ASYNC
async def test_a_used_session_is_reissued_and_an_unused_one_expires(site):
    app, url = site
    secret = load_secret(app.config.path(app.config.web.session_secret))

    def issued(days_ago: float) -> str:
        when = time.time() - days_ago * 86400
        return Authenticator(secret=secret, keys={}, admin_token=None, admins=[], open_api=False,
                             clock=lambda: when).new_session()

    used = issued(2)
    status, _, fresh = await with_cookie(url, used)
    assert status == 200 and fresh is not None and fresh.value != used
    assert fresh.value.split(".")[0] == used.split(".")[0]  # the same browser, the same conversation
    assert fresh["max-age"] == DAYS_30 and fresh["httponly"] and fresh["samesite"] == "Strict"
    # A streamed reply's answer carries it too (set before the stream's headers go out).
    status, _, streamed = await with_cookie(url, used, "POST", "/v1/chat/completions",
                                            json={"messages": [{"role": "user", "content": "你好"}], "stream": True})
    assert status == 200 and streamed is not None and streamed.value.split(".")[0] == used.split(".")[0]
    status, _, again = await with_cookie(url, fresh.value)
    assert status == 200 and again is None  # used today: not re-issued on every request

    stale = issued(31)
    status, body, none = await with_cookie(url, stale)
    assert status == 401 and "expired" in body["error"]["message"] and none is None
    status, _, replaced = await with_cookie(url, stale, path="/")
    assert status == 200 and replaced.value.split(".")[0] != stale.split(".")[0]  # a new session


@ASYNC
async def test_rolebot_sessions_revoke_signs_browsers_out_at_once_and_across_restarts(tmp_path, model_url, capsys):
    text = config(model_url, str(tmp_path / "no-local-model"))
    config_path = str(tmp_path / "config.toml")
    async with serving(tmp_path, text) as (app, url):
        alice, bob = (await new_browser(url)).value, (await new_browser(url)).value
        assert (await with_cookie(url, alice))[0] == 200 and (await with_cookie(url, bob))[0] == 200
        status, _, _ = await with_cookie(url, alice, "POST", "/v1/chat/completions",
                                         json={"messages": [{"role": "user", "content": "你好"}]})
        assert status == 200
        assert main(["--config", config_path, "sessions", "list"]) == 0  # where the id to revoke is found
        assert f"{alice.split('.')[0]}  last active" in capsys.readouterr().out
        assert main(["--config", config_path, "sessions", "revoke", alice.split(".")[0]]) == 0
        status, body, _ = await with_cookie(url, alice)  # the running bot, no restart
        assert status == 401 and "revoked" in body["error"]["message"]
        assert (await with_cookie(url, bob))[0] == 200
        status, _, replaced = await with_cookie(url, alice, path="/")
        assert replaced.value.split(".")[0] != alice.split(".")[0]  # the page starts a new session
    async with serving(tmp_path, text) as (app, url):
        assert (await with_cookie(url, alice))[0] == 401 and (await with_cookie(url, bob))[0] == 200
        assert main(["--config", config_path, "sessions", "revoke", "--all"]) == 0
        assert (await with_cookie(url, bob))[0] == 401
    async with serving(tmp_path, text) as (app, url):
        assert (await with_cookie(url, bob))[0] == 401
        assert (await with_cookie(url, (await new_browser(url)).value))[0] == 200
