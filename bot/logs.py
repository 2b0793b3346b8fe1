"""Log hygiene: no credential reaches a log line, and requests that are not HTTP are one line.

aiohttp logs a request it cannot parse (a header with a NUL byte, TLS sent to the HTTP port, a
line too long) at ERROR with a traceback whose message quotes the raw header line: a probe that
sends ``Authorization: Bearer <admin token>\\x00`` put the admin token into ``serve.log`` in full,
and each such request added an ERROR and ten lines of traceback. ``MalformedRequests`` (on
aiohttp's server logger) turns them into one WARNING line, at most one a minute, counting the
rest; ``Redact`` (on that logger and on every handler ``rolebot`` logs through) replaces
credentials in every message and traceback: the secrets the front-ends registered with
``keep_secret`` (the admin token, bot tokens) and whatever looks like one (the value of an
Authorization, Cookie or API-key header, a Bearer token, a session cookie: API keys are held only
as hashes, so these patterns are what redact them).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

REDACTED = "[redacted]"
MALFORMED_EVERY_S = 60.0
# The shortest value registered as a secret: shorter ones would be replaced inside ordinary words.
MIN_SECRET_CHARS = 8

_secrets: set[str] = set()
_lock = threading.Lock()
_patterns = [
    # A header that carries a credential, up to the end of the line or the quote of a repr().
    re.compile(r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key|api-key)(\s*[:=]\s*)[^\r\n'\"]+"),
    # A bearer token wherever it stands ("Basic" only in a header: "basic" is an ordinary word).
    re.compile(r"(?i)\b(bearer)(\s+)[^\s'\",;]{8,}"),
    # The chat page's session cookie.
    re.compile(r"\b(rolebot_session)(=)[^\s;'\",]+"),
]


def keep_secret(value: str | None) -> None:
    """From now on ``value`` is replaced in every log line that passes a ``Redact`` filter."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    for pattern in _patterns:
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class Redact(logging.Filter):
    """Replaces credentials in a record's message and in its traceback text. On a logger it
    sees that logger's own records; on a handler, every record the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters print exc_text when it is set, and format exc_info only when it is not.
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact(text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class MalformedRequests(logging.Filter):
    """aiohttp's record of a request it could not parse becomes one WARNING line without the
    traceback, at most one every ``every_s`` seconds; the line after a quiet spell says how many
    were left out. Every other record passes as it is."""

    def __init__(self, every_s: float = MALFORMED_EVERY_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._last: float | None = None
        self.skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError  # here: the CLI imports this module

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            self.skipped += 1
            return False
        more = ""
        if self.skipped:
            more = f"; {self.skipped} more in the {now - self._last:.0f} s before it were not logged"
        self._last, self.skipped = now, 0
        first = (error.message or type(error).__name__).strip().splitlines()[0].rstrip(": ")
        client = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else "a client"
        record.msg = (f"web: refused a malformed HTTP request from {client} ({error.code}: {redact(first)[:120]}); "
                      f"at most one such line a minute{more}")
        record.args = None
        record.exc_info, record.exc_text = None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


# aiohttp's loggers that see raw requests; access logging is off in rolebot.
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


class ServerLogs:
    """The filters on aiohttp's loggers while a web front-end runs (``install`` / ``remove``)."""

    def __init__(self) -> None:
        self.malformed = MalformedRequests()
        self.redact = Redact()

    def install(self) -> None:
        logging.getLogger("aiohttp.server").addFilter(self.malformed)  # first: it drops the traceback
        for name in AIOHTTP_LOGGERS:
            logging.getLogger(name).addFilter(self.redact)

    def remove(self) -> None:
        logging.getLogger("aiohttp.server").removeFilter(self.malformed)
        for name in AIOHTTP_LOGGERS:
            logging.getLogger(name).removeFilter(self.redact)


def redact_handlers(logger: logging.Logger | None = None) -> None:
    """A ``Redact`` on each handler of ``logger`` (the root logger: everything rolebot logs)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, Redact) for f in handler.filters):
            handler.addFilter(Redact())
