"""Terminal chat: the same core as Discord and Slack, in a terminal. Ctrl-C stops a reply, /quit leaves.

In a terminal the chat reads keys itself (non-canonical mode) rather than lines from the kernel, whose line
editor keeps at most 4,095 characters of a line and silently drops the rest of a long paste.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import getpass
import os
import signal
import sys
import termios
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from typing import IO, Any

from bot.conversations import ConversationManager
from bot.errors import LlamarelayError
from bot.types import Controls, Incoming, SessionKey
from bot.wording import model_changed, model_list

__all__ = ["ConsoleTarget", "run_console"]

HELP = (
    "Commands: /reset (forget this conversation), /system [text] (show or set the system prompt), "
    "/model [name] (show the models or pick one), /quit. Ctrl-C stops a reply."
)
COMMANDS = ("/help", "/reset", "/system", "/model")  # and /quit or /exit
PROMPT = "you> "
MAX_LINE_BYTES = 16 * 2**20  # asyncio's default (64 KiB) is shorter than a pasted document
PASTE_START, PASTE_END = "\033[200~", "\033[201~"  # bracketed paste: the terminal marks what was pasted


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
            self._write(text[len(self._shown) :])
        elif self._out.isatty():  # a status line ("Thinking…") replaced by the reply: redraw the line
            self._write("\r\033[Kbot> " + text)
        else:
            self._write("\n" + text)
        self._shown = text

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


class LineEditor:
    """Turns the keys of a terminal in non-canonical mode into lines, with no length limit: Backspace and
    Ctrl-U edit, Enter ends a line, Ctrl-D on an empty line ends the input, and a bracketed paste is kept
    whole, its newlines included (Enter then sends it). Other escape sequences (arrow keys) are ignored."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.lines: deque[str | None] = deque()
        """Finished lines, oldest first; None is the end of the input."""
        self._echo = echo
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._line: list[str] = []
        self._escape = ""  # an escape sequence read so far
        self._pasting = False
        self._shown: list[str] = []  # echo of this feed, written at once (a paste is one write, not 100,000)

    def feed(self, data: bytes) -> None:
        for char in self._decoder.decode(data):
            if self._escape or char == "\033":
                self._escape += char
                self._end_escape()
            elif char in "\r\n" and self._pasting:  # terminals paste line ends as CR
                self._add("\n")
            elif char in "\r\n":
                self._shown.append("\n")
                self.lines.append("".join(self._line))
                self._line.clear()
            elif char in "\x7f\b":
                if self._line:
                    self._line.pop()
                    self._shown.append("\b \b")
            elif char == "\x15":  # Ctrl-U
                self._shown.append("\b \b" * len(self._line))
                self._line.clear()
            elif char == "\x04":  # Ctrl-D
                if not self._line:
                    self.lines.append(None)
            elif char >= " " or char == "\t":
                self._add(char)
        if self._shown:
            self._echo("".join(self._shown))
            self._shown.clear()

    def _add(self, char: str) -> None:
        self._line.append(char)
        self._shown.append(char)

    def _end_escape(self) -> None:
        """Drop an escape sequence once it is whole (CSI ends with a character in @..~, SS3 one character
        after its O, others at once), taking note of a paste's start and end."""
        sequence = self._escape
        if sequence[1:2] == "[":
            whole = len(sequence) > 2 and "@" <= sequence[-1] <= "~"
        else:
            whole = len(sequence) > (2 if sequence[1:2] == "O" else 1)
        if whole:
            self._escape = ""
            if sequence in (PASTE_START, PASTE_END):
                self._pasting = sequence == PASTE_START


async def run_console(
    manager: ConversationManager, *, user: str | None = None, stdin: IO[str] = sys.stdin, out: IO[str] = sys.stdout
) -> None:
    """Chat on stdin/stdout until /quit, end of input, or Ctrl-C at the prompt."""
    with _terminal_restored(stdin):
        editor = LineEditor(lambda text: _write(out, text)) if _keys_mode(stdin, out) else None
        await _chat(manager, user=user, stdin=stdin, out=out, editor=editor)


def _keys_mode(stdin: IO[str], out: IO[str]) -> bool:
    """Switch a terminal on stdin (that shows ``out``) to non-canonical mode without echo, and turn on
    bracketed paste; False when stdin and ``out`` are not one terminal, and lines are read as they come."""
    try:
        fd = stdin.fileno()
        if not (os.isatty(fd) and out.isatty()):
            return False
        attributes = termios.tcgetattr(fd)
    except (AttributeError, OSError, ValueError, termios.error):
        return False
    attributes[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)  # ISIG stays: Ctrl-C is still SIGINT
    attributes[6][termios.VMIN], attributes[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, attributes)
    _write(out, "\033[?2004h")
    return True


def _write(out: IO[str], text: str) -> None:
    out.write(text)
    out.flush()


@contextlib.contextmanager
def _terminal_restored(stdin: IO[str]) -> Iterator[None]:
    """Put stdin back as it was (blocking, same terminal attributes) on every way out.

    asyncio's read pipe makes the fd non-blocking, and that flag belongs to the open file the shell shares
    with us: left set, the next program started from that shell fails to read its input.
    """
    fd: int | None
    try:
        fd = stdin.fileno()
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


async def _chat(
    manager: ConversationManager, *, user: str | None, stdin: IO[str], out: IO[str], editor: LineEditor | None
) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    transport = None
    if editor is None:  # keys are read without a pipe: it would make the terminal non-blocking, and that is
        # stdout's file too, where a long paste's echo would then be cut short
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
    out.write(f"llamarelay terminal chat with {manager.status().engine.model_name}. {HELP}\n")
    try:
        while not quitting.is_set():
            out.write(PROMPT)
            out.flush()
            try:
                line = await (
                    _read_line(reader, quitting) if editor is None else _read_keys(stdin.fileno(), editor, quitting)
                )
            except ValueError:  # a pasted line longer than MAX_LINE_BYTES: dropped
                out.write(f"That line is longer than {MAX_LINE_BYTES // 2**20} MB; please send a shorter one.\n")
                continue
            if line is None:
                break
            text = line.strip()
            if text in ("/quit", "/exit"):
                break
            if text.split(" ", 1)[0] in COMMANDS:
                try:
                    out.write(await _command(manager, key, user, text) + "\n")
                except LlamarelayError as exc:  # e.g. the database is gone: the user reads why, and chats on
                    out.write(f"{exc}\n")
            else:
                target = ConsoleTarget(out)
                replying.set()
                try:
                    await manager.respond(Incoming(key, user, user, line.rstrip("\n")), target)
                finally:
                    replying.clear()
                    target.end()
    finally:
        if transport is not None:
            transport.close()
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        out.write(("\033[?2004l" if editor else "") + "\nBye.\n")
        out.flush()


async def _command(manager: ConversationManager, key: SessionKey, user: str, text: str) -> str:
    """What a command line (one of `COMMANDS`) answers."""
    command, _, argument = text.partition(" ")
    argument = argument.strip()
    if command == "/help":
        return HELP
    if command == "/reset":
        await manager.reset(key)
        return "Conversation cleared."
    if command == "/system":
        if not argument:
            return f"System prompt: {await manager.system_prompt(key)}"
        await manager.set_system_prompt(key, argument)
        return "System prompt set."
    return await _model_command(manager, key, user, argument)


async def _model_command(manager: ConversationManager, key: SessionKey, user: str, name: str) -> str:
    """``/model``: the conversation's model and the list; ``/model <name>``: pick it (the terminal is the
    user's own conversation, as a DM is)."""
    if not name:
        choices = [(model.name, model.description) for model in manager.model_choices()]
        return model_list(await manager.model_name(key), choices)
    try:
        return model_changed((await manager.set_model(key, name)).name, user)
    except LlamarelayError as exc:  # an unknown name: the line names it and the choices
        return str(exc)


async def _read_line(reader: asyncio.StreamReader, quitting: asyncio.Event) -> str | None:
    """The next line, or None at end of input or when Ctrl-C is pressed at the prompt."""
    data = await _unless_quitting(reader.readline(), quitting)
    return data.decode("utf-8", "replace") if data else None


async def _read_keys(fd: int, editor: LineEditor, quitting: asyncio.Event) -> str | None:
    """The next line typed or pasted in the terminal ``fd``, or None at Ctrl-D, a hang-up or Ctrl-C."""
    while not editor.lines:
        data = await _unless_quitting(_ready(fd), quitting)
        if not data:
            return None
        editor.feed(data)
    line = editor.lines.popleft()
    if line is not None and len(line) > MAX_LINE_BYTES:
        raise ValueError("line too long")
    return line


async def _ready(fd: int) -> bytes:
    """What the terminal ``fd`` has to read once it has some (b"" when it hung up), without making it
    non-blocking."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    try:
        return os.read(fd, 2**16)
    except OSError:  # EIO: the terminal is gone
        return b""


async def _unless_quitting(read: Coroutine[Any, Any, bytes], quitting: asyncio.Event) -> bytes | None:
    """What ``read`` gives, or None when Ctrl-C is pressed first."""
    reading = asyncio.ensure_future(read)
    quit_wait = asyncio.ensure_future(quitting.wait())
    await asyncio.wait({reading, quit_wait}, return_when=asyncio.FIRST_COMPLETED)
    quit_wait.cancel()
    if not reading.done():
        reading.cancel()
        return None
    return reading.result()
