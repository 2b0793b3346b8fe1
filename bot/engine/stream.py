"""One reply as the service sees it: a stream of text pieces, and the decoding that makes them.

Every backend hands the service a ``ReplyStream``. The local engine turns token ids into pieces
with ``IncrementalDecoder`` (never half a character); both backends pass the text through
``training.hygiene.ReplyFilter`` (never a stop string, template scaffolding, another speaker's
line or the persona, nor the start of one that may still complete).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplyStats:
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None  # seconds from submit to the first text piece
    total_s: float
    adapter_version: str | None  # the version that generated this whole reply
    finish_reason: str  # "stop" | "length" | "interrupted" | "error"


class ReplyStream:
    """One reply: iterate it (``async for piece in stream``) for its text pieces.

    Stop strings and scaffolding are never shown (``ReplyFilter``). When iteration ends
    ``stats`` says why and how fast; a reply that failed ends with ``finish_reason == "error"``
    and ``error`` set, rather than raising, so a front-end can always show what arrived. Leaving the loop early cancels the reply.
    """

    def __init__(self, prompt_tokens: int, adapter_version: str | None, on_cancel: Callable[[], None] = lambda: None):
        self.prompt_tokens = prompt_tokens
        self.adapter_version = adapter_version
        self.stats: ReplyStats | None = None
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self.cancelled = False
        self._on_cancel = on_cancel
        self._pieces: asyncio.Queue[str | ReplyStats] = asyncio.Queue()

    def cancel(self) -> None:
        """Stop generating this reply (e.g. the user left); it ends with "interrupted"."""
        if self.stats is None and not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._pieces.get()
                if isinstance(item, ReplyStats):
                    return
                yield item
        finally:
            if self.stats is None:
                self.cancel()

    async def text(self) -> str:
        """The whole reply, for callers that do not stream."""
        return "".join([piece async for piece in self])

    # Called by the backend, on the event loop's thread only.
    def _put(self, piece: str) -> None:
        if self.stats is None and piece:
            self._pieces.put_nowait(piece)

    def _finish(self, stats: ReplyStats, error: str | None = None) -> None:
        if self.stats is None:
            self.stats, self.error = stats, error
            self._pieces.put_nowait(stats)

    def _end_now(self, reason: str, error: str | None = None) -> ReplyStream:
        self._finish(ReplyStats(self.prompt_tokens, 0, None, time.perf_counter() - self.submitted,
                                self.adapter_version, reason), error)
        return self


class IncrementalDecoder:
    """Turns one reply's token ids into text pieces without splitting a multi-byte character.

    Byte-level tokenizers spread one character over several tokens; decoding a token alone gives
    U+FFFD. A piece is released only once its text no longer ends in U+FFFD, and each piece is
    decoded together with the tokens before it so that word-boundary spaces come out right.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window decoded with each new token
        self.read = 0  # tokens already turned into released text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):].rstrip("\ufffd")
