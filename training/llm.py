"""One chat request at a time to any OpenAI-compatible endpoint, with every outcome counted.

Shared by augmentation (``training.augment``) and the novel extractor (``training.novel_llm``).
Transport failures (429, 5xx, timeouts, refused connections) are retried by the ``openai``
client itself with exponential back-off (``Endpoint.max_retries``); what is left after that
comes back as a failed ``Answer`` with its reason counted. A refused key or a wrong URL (401,
403, 404) is ``fatal``: asking again cannot help, so the caller stops.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import openai

from training.errors import UserError

UNREADABLE = "unreadable response (not a chat completion)"


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str = "OPENAI_API_KEY"  # named in error messages only
    timeout: float = 120.0
    max_retries: int = 3
    concurrency: int = 4
    temperature: float = 0.9
    max_tokens: int = 1024


class Traffic(Protocol):
    """Where a client counts its requests: requested = received + failed + cancelled."""

    requested: int
    received: int
    failed: int
    cancelled: int
    attempts: int  # HTTP requests sent, the client's own retries included
    statuses: Counter[int]
    failures: Counter[str]


@dataclass(frozen=True)
class Answer:
    """The answer's text (None when the request failed), whether asking again may help (not
    after the client has spent its own retries), the HTTP status of a refusal, and the
    tokens the server says it used."""

    text: str | None
    again: bool = True
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatClient:
    """``await client.ask(prompt)`` until done, then ``await client.close()``."""

    def __init__(self, endpoint: Endpoint, traffic: Traffic, purpose: str):
        self.endpoint = endpoint
        self.traffic = traffic
        self.fatal: UserError | None = None
        self._user = f"rolebot-{purpose}-{uuid.uuid4().hex[:8]}"
        self._calls = 0

        async def on_request(request) -> None:
            traffic.attempts += 1

        async def on_response(response) -> None:
            traffic.statuses[response.status_code] += 1

        self._openai = openai.AsyncOpenAI(
            base_url=endpoint.base_url,
            # The client insists on a key; servers without one (vLLM, rolebot serve) ignore it.
            api_key=endpoint.api_key or "EMPTY",
            timeout=endpoint.timeout,
            max_retries=endpoint.max_retries,
            http_client=openai.DefaultAsyncHttpxClient(
                event_hooks={"request": [on_request], "response": [on_response]}),
        )

    async def close(self) -> None:
        await self._openai.close()

    async def ask(self, prompt: str, **extra) -> Answer:
        """One user message; ``extra`` goes into the request as it is (e.g. response_format)."""
        traffic, endpoint = self.traffic, self.endpoint
        self._calls += 1
        traffic.requested += 1
        try:
            completion = await self._openai.chat.completions.create(
                model=endpoint.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=endpoint.temperature,
                max_tokens=endpoint.max_tokens,
                # A server that keeps per-user history (rolebot serve does) must not chain
                # independent requests into one conversation.
                user=f"{self._user}-{self._calls}",
                **extra,
            )
        except asyncio.CancelledError:
            traffic.cancelled += 1
            raise
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            self.fatal = self.fatal or self._refusal(exc)
            return self._fail(f"HTTP {exc.status_code}", status=exc.status_code)
        except openai.APIStatusError as exc:
            return self._fail(f"HTTP {exc.status_code}", status=exc.status_code)
        except openai.APITimeoutError:
            return self._fail(f"timed out after {endpoint.timeout:g} s")
        except openai.APIConnectionError:
            return self._fail("connection failed")
        except (openai.APIError, ValueError):
            return self._fail(UNREADABLE, again=True)
        if not completion.choices or completion.choices[0].message is None:
            return self._fail(UNREADABLE, again=True)
        traffic.received += 1
        usage = completion.usage
        return Answer(completion.choices[0].message.content or "", True, None,
                      getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)

    def _fail(self, reason: str, again: bool = False, status: int | None = None) -> Answer:
        self.traffic.failed += 1
        self.traffic.failures[reason] += 1
        return Answer(None, again, status)

    def _refusal(self, exc: openai.APIStatusError) -> UserError:
        endpoint = self.endpoint
        todo = {401: f"set the API key in the environment variable {endpoint.api_key_env} "
                     "(or name another with --api-key-env)",
                403: f"the key in {endpoint.api_key_env} may not use this model or endpoint",
                404: f"check --base-url (it usually ends in /v1) and --model {endpoint.model!r}"}[exc.status_code]
        return UserError(f"{endpoint.base_url}: HTTP {exc.status_code} on chat/completions — {todo}")
