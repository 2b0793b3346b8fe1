"""Cutting a reply into platform messages, pacing its edits and rewriting a reply in place (🔄),
shared by the Discord and Telegram front-ends."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.service import Reply, Service

RATINGS = {"👍": 1, "👎": -1}  # what a reaction or a button press records
RETRY = "🔄"  # under a finished reply: write another one in its place
STOP = "⏹"  # under a reply being written: stop it there
NO_TEXT = "（…）"  # a reply that ended before any text; both platforms refuse empty messages


def utf16_len(text: str) -> int:
    """Telegram counts message length in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def split(text: str, limit: int, measure: Callable[[str], int] = len) -> list[str]:
    """Cut text into messages of at most ``limit`` units (``measure`` counts them): at a line
    break in the second half of a message if there is one, else at a space there, never inside
    a character. Each cut depends only on the text before it, so a streamed reply keeps its
    earlier parts as it grows."""
    parts = []
    while measure(text) > limit:
        fits, units = 0, 0
        for ch in text:
            units += measure(ch)
            if units > limit:
                break
            fits += 1
        head = text[:fits]
        at = head.rfind("\n")
        if at <= fits // 2:
            at = head.rfind(" ")
        cut = at if at > fits // 2 else fits
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    parts.append(text)
    return [p for p in parts if p.strip()] or [NO_TEXT]


async def paced_edits(reply: Reply, interval: float, show: Callable[[str], Awaitable[bool]], *,
                      last_edit: bool = False) -> str:
    """Call ``show(text)`` as a streamed reply grows, at most once every ``interval`` seconds
    (``show`` says whether the text is now shown; False: skipped, shown by a later call). Returns
    the reply's final text once showing it is due, paced like the edits before it; the caller
    shows it. ``last_edit``: the caller edits at the end even if the text is shown already (its
    buttons change), so that edit is paced too."""
    loop = asyncio.get_running_loop()
    text, shown, last = "", "", -math.inf
    async for piece in reply:
        text += piece
        if loop.time() - last >= interval and text.strip():
            if await show(text):
                shown = text
            last = loop.time()
    result = await reply.result()
    # A reply dropped before it began (it waited past [service] max_wait_s) shows why instead.
    final = result.text or result.notice or NO_TEXT
    if last_edit or final != shown.strip():
        await asyncio.sleep(max(0.0, last + interval - loop.time()))
    return final


class Showing:
    """The replies a front-end is showing now, by reply row: a ⏹ finds the one to stop here, and
    a regenerate that rewrites a reply's messages waits until the front-end is done showing the
    reply it replaces (its last edit), so two writers never edit one message."""

    def __init__(self) -> None:
        self._replies: dict[int, tuple[Reply, asyncio.Event]] = {}

    @contextmanager
    def showing(self, reply: Reply) -> Iterator[None]:
        """Mark ``reply`` as being shown until the block ends; nested marks are one."""
        if reply.message_id in self._replies:
            yield
            return
        done = asyncio.Event()
        self._replies[reply.message_id] = (reply, done)
        try:
            yield
        finally:
            del self._replies[reply.message_id]
            done.set()

    def get(self, reply_id: int) -> Reply | None:
        entry = self._replies.get(reply_id)
        return entry[0] if entry else None

    async def finished(self, reply_id: int) -> None:
        entry = self._replies.get(reply_id)
        if entry is not None:
            await entry[1].wait()


async def take_over(service: Service, showing: Showing, reply: Reply) -> tuple[list[str], list[str]]:
    """A regenerated reply takes the platform messages of the alternative it replaces: once the
    old one is shown to its end, its first message is linked to the new reply (so a rating there
    rates the new one) and returned to be edited; the rest are returned to be deleted, or they
    would show the old text under the new one as it streams (a longer reply posts new messages
    after the first, as any reply does). The old alternative keeps its links and its ratings."""
    old = reply.replaces
    if old is None or not old.platform_message_ids:
        return [], []
    await showing.finished(old.id)
    first, *rest = old.platform_message_ids
    await service.posted(reply, first)
    return [first], rest
