"""Cutting a reply into platform messages and pacing its edits, shared by the Discord and
Telegram front-ends."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.service import Reply

RATINGS = {"👍": 1, "👎": -1}  # what a reaction or a button press records
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


async def paced_edits(reply: Reply, interval: float, show: Callable[[str], Awaitable[bool]]) -> str:
    """Call ``show(text)`` as a streamed reply grows, at most once every ``interval`` seconds
    (``show`` says whether the text is now shown; False: skipped, shown by a later call). Returns
    the reply's final text once showing it is due, paced like the edits before it; the caller
    shows it."""
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
    if final != shown.strip():
        await asyncio.sleep(max(0.0, last + interval - loop.time()))
    return final
