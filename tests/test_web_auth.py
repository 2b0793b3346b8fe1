"""Who is who on the web (issue 15): a bot bound to every address (as the Docker image is), with
API keys, over real HTTP. Impersonation by cookie, key or ``user`` field is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yarl

from bot.app import App
from bot.platforms.web_auth import COOKIE, Authenticator, is_loopback, key_hash, load_keys, load_secret, parse_keys
from served import rows, serving
from training.errors import UserError

TOKEN_ENV = "ROLEBOT_TEST_AUTH_ADMIN_TOKEN"
KEYS_ENV = "ROLEBOT_TEST_AUTH_KEYS"
TOKEN = "admin-token-0123456789abcdef"
ALICE, BOB, ACME, BETA = ("sk-alice-0123456789abcdef", "sk-bob-0123456789abcdefgh",
                          "sk-acme-0123456789abcdefgh", "sk-beta-0123456789abcdefgh")
CONFIG = f"""
[model]
max_seq_length = 512

[character]
persona = "你是甄嬛，说话含蓄得体。"

[generation]
max_new_tokens = 4
temperature = 0.0

[web]
host = "0.0.0.0"
port = 0
api_keys_file = "keys.txt"
api_keys_env = "{KEYS_ENV}"

[service]
rate_limit_per_minute = 100
admin_token_env = "{TOKEN_ENV}"
admins_web = ["alice"]
"""

pytestmark = pytest.mark.slow
ASYNC = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def site(tmp_path_factory, builtin_path):
    root = tmp_path_factory.mktemp("auth")
    (root / "keys.txt").write_text(f"# key identity\n{ALICE} alice\n{BOB} bob\n{ACME} acme/*\n", encoding="utf-8")
    os.environ[TOKEN_ENV] = TOKEN
    os.environ[KEYS_ENV] = f"{BETA}=beta/*"
    try:
        async with serving(root, CONFIG) as (app, url):
            yield app, url, root
    finally:
        del os.environ[TOKEN_ENV], os.environ[KEYS_ENV]


async def chat(url: str, text: str, *, key: str | None = None, user: str | None = None,
               session: aiohttp.ClientSession | None = None) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": text}]} | ({"user": user} if user else {})
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (session or aiohttp.ClientSession()) as http:
        async with http.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
            return response.status, await response.json()


def speaker(app: App, answer: dict) -> str:
    [row] = rows(app, "SELECT u.platform_user_id FROM messages m JOIN users u ON u.id = m.user_id WHERE m.id = ?",
                 answer["rolebot"]["user_message_id"])
    return row[0]


@ASYNC
async def test_off_loopback_a_request_without_a_valid_key_is_refused(site):
    app, url, _ = site
    before = rows(app, "SELECT COUNT(*) FROM messages")[0][0]
    for key, user in ((None, None), (None, "alice"), ("sk-wrong-0123456789abcdef", "alice")):
        status, body = await chat(url, "你好", key=key, user=user)
        assert status == 401 and body["error"]["type"] == "authentication_error", (key, user)
    assert "API key" in body["error"]["message"]
    assert rows(app, "SELECT COUNT(*) FROM messages")[0][0] == before  # nothing logged, nothing run


@ASYNC
async def test_a_key_is_its_identity_and_the_user_field_cannot_change_it(site):
    app, url, _ = site
    status, answer = await chat(url, "我是谁", key=BOB, user="alice")
    assert status == 200 and speaker(app, answer) == "bob"
    # Bob's key cannot rate Alice's reply, nor Alice's key Bob's: to them it does not exist.
    status, alices = await chat(url, "只有我看得见", key=ALICE)
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/api/ratings", json={"message_id": int(alices["id"]), "user": "alice", "value": -1},
                             headers={"Authorization": f"Bearer {BOB}"}) as response:
            assert response.status == 404
        async with http.post(url + "/api/ratings", json={"message_id": int(alices["id"]), "value": 1},
                             headers={"Authorization": f"Bearer {ALICE}"}) as response:
            assert response.status == 200
    assert [r["value"] for r in rows(app, "SELECT value FROM ratings WHERE message_id = ?", int(alices["id"]))] == [1]


@ASYNC
async def test_a_many_user_key_namespaces_its_users(site):
    app, url, _ = site
    status, acme_bob = await chat(url, "我是 acme 的 bob", key=ACME, user="bob")
    status2, beta_bob = await chat(url, "我是 beta 的 bob", key=BETA, user="bob")
    assert (status, status2) == (200, 200)
    assert speaker(app, acme_bob) == "acme/bob" and speaker(app, beta_bob) == "beta/bob"
    # The same "bob" under two keys is two conversations: neither prompt holds the other's words.
    [prompt] = rows(app, "SELECT prompt FROM messages WHERE id = ?", int(beta_bob["id"]))
    assert "acme" not in prompt[0]
    status, dotted = await chat(url, "假装是 bob", key=ACME, user="../bob")  # stays under acme/
    assert status == 200 and speaker(app, dotted) == "acme/../bob"
    # beta's key cannot reach acme's users, even by naming them in full.
    status, other = await chat(url, "我是 acme/bob", key=BETA, user="acme/bob")
    assert speaker(app, other) == "beta/acme/bob"


@ASYNC
async def test_the_page_gives_a_signed_httponly_cookie_and_a_forged_one_is_refused(site):
    app, url, _ = site
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(url + "/") as response:
            assert response.status == 200
            header = response.headers["Set-Cookie"]
        assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
        cookie = jar.filter_cookies(yarl.URL(url))[COOKIE].value
        async with http.post(url + "/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "网页来客"}], "user": "alice"}) as response:
            assert response.status == 200
            answer = await response.json()
    user = speaker(app, answer)
    assert user == cookie.split(".")[0] and user.startswith("web-")  # the cookie's id, not "alice"
    assert "网页来客" in rows(app, "SELECT prompt FROM messages WHERE id = ?", int(answer["id"]))[0][0]

    forged = [
        "web-someoneelse.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # a made-up signature
        user + "x." + cookie.split(".", 1)[1],  # another id with this cookie's time and signature
        f"{user}.{int(cookie.split('.')[1]) + 10**9}.{cookie.split('.')[2]}",  # a later time, the same signature
        "alice",  # no signature at all
    ]
    for value in forged:
        async with aiohttp.ClientSession(cookies={COOKIE: value}) as http:
            async with http.post(url + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "冒充"}]}) as response:
                assert response.status == 401, value
                assert "cookie" in (await response.json())["error"]["message"]
    assert not rows(app, "SELECT 1 FROM messages WHERE text = '冒充'")


@ASYNC
async def test_web_admins_need_the_token_or_an_admin_key(site):
    app, url, _ = site
    runs = rows(app, "SELECT COUNT(*) FROM training_runs")[0][0]
    for key, user in ((BOB, "alice"), (ACME, "alice")):  # claiming the admin's id proves nothing
        for command in ("/status", "/rollback", "/retrain"):
            status, answer = await chat(url, command, key=key, user=user)
            assert status == 200 and answer["choices"][0]["message"]["content"] == f"{command} is for admins only."
    status, answer = await chat(url, "/status", key=ALICE)  # alice's own key, listed in admins_web
    assert "serving the base model" in answer["choices"][0]["message"]["content"]
    status, answer = await chat(url, "/status", key=TOKEN)
    assert "serving the base model" in answer["choices"][0]["message"]["content"]
    assert rows(app, "SELECT COUNT(*) FROM training_runs")[0][0] == runs
    async with aiohttp.ClientSession() as http:
        for key in (ALICE, BOB):  # the admin API takes the admin token, not a user's key
            async with http.get(url + "/api/admin/status", headers={"Authorization": f"Bearer {key}"}) as response:
                assert response.status == 401
        async with http.get(url + "/api/admin/status", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200


@ASYNC
async def test_the_session_secret_is_private_and_survives_a_restart(site):
    _, _, root = site
    path = root / "web_session.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = Authenticator(secret=load_secret(path), keys={}, admin_token=None, admins=[], open_api=False)
    again = Authenticator(secret=load_secret(path), keys={}, admin_token=None, admins=[], open_api=False)
    cookie = first.new_session()
    assert again.session_user(cookie) == cookie.split(".")[0]
    other = Authenticator(secret=load_secret(root / "other.key"), keys={}, admin_token=None, admins=[], open_api=False)
    assert other.session_user(cookie) is None


# Keys and hosts: no server needed.


def test_key_files_are_checked_line_by_line(tmp_path: Path):
    keys = parse_keys("# comment\n\nsk-0123456789abcdef alice  # trailing\nsk-fedcba9876543210 acme/*\n", "keys.txt")
    # Held by the keys' hashes (tests/test_credentials.py: no key stays in memory).
    assert {k: v.identity for k, v in keys.items()} == {key_hash("sk-0123456789abcdef"): "alice",
                                                        key_hash("sk-fedcba9876543210"): "acme/*"}
    acme, alice = keys[key_hash("sk-fedcba9876543210")], keys[key_hash("sk-0123456789abcdef")]
    assert acme.user("bob") == "acme/bob" and acme.user(None) == "acme/anonymous"
    assert alice.user("bob") == "alice"
    bad = {
        "short alice": "line 1: the key is 5 characters",
        "sk-0123456789abcdef": "line 1: expected 'KEY IDENTITY'",
        "sk-0123456789abcdef al ice": "got 3 fields",
        "sk-0123456789abcdef admin": "may not be 'admin'",
        "sk-0123456789abcdef web-x": "start with 'web-'",
        "sk-0123456789abcdef a/b/*": "identity 'a/b/*'",
        "sk-0123456789abcdef a\nsk-0123456789abcdef b": "line 2: this key is already listed (keys.txt line 1)",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            parse_keys(text, "keys.txt")
    with pytest.raises(UserError, match="api_keys_file .*missing.txt"):
        load_keys(tmp_path / "missing.txt", "")


def test_which_hosts_are_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""))
