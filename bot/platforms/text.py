"""Cutting a reply into platform messages, shared by the Discord and Telegram front-ends."""

from __future__ import annotations

from collections.abc import Callable

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
