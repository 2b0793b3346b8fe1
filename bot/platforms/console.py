"""The console front-end: chat with the character in the terminal that runs ``rolebot serve``
(beside the other front-ends) or ``rolebot chat`` (alone).

A line is a message (or a command: /reset, /forget, /status, /retrain, /rollback, /help);
``+`` or ``-`` rates the last reply 👍 or 👎; ``r`` (or /retry) writes another reply to your
last message, printed below (the earlier one stays in the log as an alternative); /stop typed
while a reply is printing stops it there, its text kept (lines other than /stop typed meanwhile
wait for the reply's end); /quit or Ctrl-D stops the bot. Ctrl-C stops the whole bot, as it
does for ``rolebot serve``: it is the process's signal, not the console's. Whoever sits at the
console runs the process, so the admin commands are theirs. With ``once`` it sends that one
message, prints the reply and stops, reading nothing from the terminal. With a cast, the console
talks to one character: the first, or ``rolebot chat --character NAME``'s; its replies are
labelled with its name.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from typing import TextIO

from bot.config import Config
from bot.platforms import Options
from bot.service import Answer, IncomingMessage, Reply, Service
from training.errors import UserError

PLATFORM = "console"
USER = "console"  # one person at one terminal: one user, one chat
RATINGS = {"+": 1, "-": -1}
RETRY = "r"  # another reply to the last message, like /retry
STOP = b"/stop"


def from_config(config: Config, service: Service, options: Options) -> Console | None:
    if not (config.console.enabled and options.interactive):
        return None
    return Console(service, on_quit=options.on_quit)


class Console:
    name = "console"

    def __init__(self, service: Service, *, fd: int | None = None, out: TextIO | None = None,
                 on_quit=None, once: str | None = None):
        self.service = service
        self.once = once
        self.fd = fd  # None: the terminal's stdin, looked up at start (once reads none)
        self.out = out or sys.stdout
        self.on_quit = on_quit
        self.last_reply: int | None = None
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._held: deque[bytes | None] = deque()  # lines typed while a reply printed
        self._buffer = b""
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.service.notifiers[PLATFORM] = self.notify
        if self.once is not None:
            self._task = asyncio.create_task(self._answer_once(self.once))
            return
        # A reader callback rather than input() in a thread: a thread blocked in input() could
        # not be stopped, and shutdown would wait for the user to press Enter.
        self.fd = sys.stdin.fileno() if self.fd is None else self.fd
        asyncio.get_running_loop().add_reader(self.fd, self._readable)
        cast = self.service.cast
        others = (f" (of the cast: {', '.join(cast.names)}; `rolebot chat --character NAME` talks to another)"
                  if cast is not None and len(cast) > 1 else "")
        self._write(f"Chatting with {self.service.character}{others}. + / - rate the last reply, r writes "
                    "another, /stop stops one printing; /help lists the commands; /quit or Ctrl-D "
                    "stops the bot.\n")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.service.notifiers.pop(PLATFORM, None)
        if self.once is None:
            asyncio.get_running_loop().remove_reader(self.fd)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def notify(self, chat_id: str, text: str) -> None:
        """News nobody asked for just now, e.g. how a /retrain ended."""
        self._write(f"\n({text})\n")

    def _readable(self) -> None:
        """Split what the terminal sent into lines; bytes stay bytes until the service decodes
        them, so invalid UTF-8 is the service's to clean."""
        data = os.read(self.fd, 65536)
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
            if self._buffer:
                self._lines.put_nowait(self._buffer)
            self._lines.put_nowait(None)
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._lines.put_nowait(line)

    async def _run(self) -> None:
        self._write("你：")
        while (line := await self._next_line()) is not None:
            if line.strip() in (b"/quit", b"/exit"):
                break
            await self._line(line)
            self._write("你：")
        self._write("\n")
        if self.on_quit is not None:
            self.on_quit()

    async def _next_line(self) -> bytes | None:
        return self._held.popleft() if self._held else await self._lines.get()

    async def _watch_for_stop(self, reply: Reply) -> None:
        """While a reply prints: /stop stops it; other lines wait their turn."""
        while True:
            line = await self._lines.get()
            if line is not None and line.strip() == STOP:
                reply.cancel()
                continue
            self._held.append(line)
            if line is None:  # Ctrl-D: the reply still prints to its end
                return

    async def _answer_once(self, text: str) -> None:
        try:
            await self._line(text.encode())
        finally:
            if self.on_quit is not None:
                self.on_quit()

    async def _line(self, line: bytes) -> None:
        word = line.strip().decode("utf-8", "replace")
        if word in RATINGS:
            self._write(await self._rate(RATINGS[word]) + "\n")
            return
        incoming = IncomingMessage(PLATFORM, USER, USER, line)
        out = await (self.service.regenerate(incoming) if word == RETRY else self.service.handle(incoming))
        if isinstance(out, Answer):
            self._write(out.text + "\n")
            return
        if out.notice:
            self._write(out.notice + "\n")
        if out.replaces is not None:
            self._write("(another reply)\n")
        self._write(f"{self.service.character}：")
        watcher = asyncio.create_task(self._watch_for_stop(out)) if self.once is None else None
        try:
            async for piece in out:
                self._write(piece)
        finally:
            if watcher is not None:
                watcher.cancel()
        result = await out.result()
        self._write("\n" if result.status == "complete" else f"\n({result.status})\n")
        self.last_reply = out.message_id

    async def _rate(self, value: int) -> str:
        if self.last_reply is None:
            return "(nothing to rate yet)"
        try:
            await self.service.rate(PLATFORM, USER, self.last_reply, value)
        except UserError as exc:
            return f"({exc})"
        return "(rated 👍)" if value > 0 else "(rated 👎)"

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
