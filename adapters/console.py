"""Terminal chat: the same core as Discord and Slack, in a terminal. Ctrl-C stops a reply, /quit leaves."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import signal
import sys
import termios
from collections.abc import Iterator
from typing import IO

from bot.conversations import ConversationManager
from bot.types import Controls, Incoming, SessionKey

__all__ = ["ConsoleTarget", "run_console"]

HELP = ("Commands: /reset (forget this conversation), /system [text] (show or set the system prompt), "
        "/quit. Ctrl-C stops a reply.")
PROMPT = "you> "
MAX_LINE_BYTES = 16 * 2**20  # asyncio's default (64 KiB) is shorter than a pasted document


class ConsoleTarget:
    """Prints a reply as it grows. A terminal can only append, so each edit prints what is new."""

    max_length = sys.maxsize
    min_edit_interval = 0.0

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._shown = ""

    async def post(self, text: str, controls: Controls | None = None) -> None:
        self._write("bot> ")
        self._show(text)

    async def post_continuation(self, text: str, controls: Controls | None = None) -> None:
        self._show(text)

    async def edit(self, handle: None, text: str, controls: Controls | None = None) -> None:
        self._show(text)

    def end(self) -> None:
        self._write("\n")
        self._shown = ""

    def _show(self, text: str) -> None:
        if text.startswith(self._shown):
            self._write(text[len(self._shown):])
        elif self._out.isatty():  # a status line ("Thinking…") replaced by the reply: redraw the line
            self._write("\r\033[Kbot> " + text)
        else:
            self._write("\n" + text)
        self._shown = text

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


async def run_console(manager: ConversationManager, *, user: str | None = None,
                      stdin: IO[str] = sys.stdin, out: IO[str] = sys.stdout) -> None:
    """Chat on stdin/stdout until /quit, end of input, or Ctrl-C at the prompt."""
    with _terminal_restored(stdin):
        await _chat(manager, user=user, stdin=stdin, out=out)


@contextlib.contextmanager
def _terminal_restored(stdin: IO[str]) -> Iterator[None]:
    """Put stdin back as it was (blocking, same terminal attributes) on every way out.

    asyncio's read pipe makes the fd non-blocking, and that flag belongs to the open file the shell shares
    with us: left set, the next program started from that shell fails to read its input.
    """
    try:
        fd: int | None = stdin.fileno()
        blocking = os.get_blocking(fd)
        attributes = termios.tcgetattr(fd) if os.isatty(fd) else None
    except (AttributeError, OSError, ValueError, termios.error):  # not a real file: nothing to restore
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
            if attributes is not None:
                with contextlib.suppress(OSError, termios.error):
                    termios.tcsetattr(fd, termios.TCSADRAIN, attributes)


async def _chat(manager: ConversationManager, *, user: str | None, stdin: IO[str], out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    user = user or getpass.getuser()
    key = SessionKey.for_dm("console", user)
    replying = asyncio.Event()
    quitting = asyncio.Event()

    def on_interrupt() -> None:
        if replying.is_set():
            manager.stop(key)
        else:
            quitting.set()

    def on_terminate() -> None:
        manager.stop(key)
        quitting.set()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    loop.add_signal_handler(signal.SIGTERM, on_terminate)
    out.write(f"llamarelay terminal chat with {manager.engine.model_name}. {HELP}\n")
    try:
        while not quitting.is_set():
            out.write(PROMPT)
            out.flush()
            try:
                line = await _read_line(reader, quitting)
            except ValueError:  # a pasted line longer than MAX_LINE_BYTES: the reader dropped it
                out.write(f"That line is longer than {MAX_LINE_BYTES // 2**20} MB; please send a shorter one.\n")
                continue
            if line is None:
                break
            text = line.strip()
            if text in ("/quit", "/exit"):
                break
            if text == "/help":
                out.write(HELP + "\n")
            elif text == "/reset":
                await manager.reset(key)
                out.write("Conversation cleared.\n")
            elif text == "/system" or text.startswith("/system "):
                prompt = text.removeprefix("/system").strip()
                if prompt:
                    await manager.set_system_prompt(key, prompt)
                    out.write("System prompt set.\n")
                else:
                    out.write(f"System prompt: {await manager.system_prompt(key)}\n")
            else:
                target = ConsoleTarget(out)
                replying.set()
                try:
                    await manager.respond(Incoming(key, user, user, line.rstrip("\n")), target)
                finally:
                    replying.clear()
                    target.end()
    finally:
        transport.close()
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        out.write("\nBye.\n")
        out.flush()


async def _read_line(reader: asyncio.StreamReader, quitting: asyncio.Event) -> str | None:
    """The next line, or None at end of input or when Ctrl-C is pressed at the prompt."""
    read = asyncio.ensure_future(reader.readline())
    quit_wait = asyncio.ensure_future(quitting.wait())
    await asyncio.wait({read, quit_wait}, return_when=asyncio.FIRST_COMPLETED)
    quit_wait.cancel()
    if not read.done():
        read.cancel()
        return None
    data = read.result()
    return data.decode("utf-8", "replace") if data else None
