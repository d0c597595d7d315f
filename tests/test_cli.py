"""The `llamarelay` command as a user runs it: terminal chat, start-up errors, signals."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from adapters.console import HELP, run_console
from bot.cli import _parser
from bot.config import Settings
from bot.conversations import ConversationManager
from tests.conftest import MODEL_PATH

SECRETS = ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "LLAMARELAY_WEB_TOKEN")
ENV = {k: v for k, v in os.environ.items() if k not in SECRETS}


def write_config(tmp_path: Path, sampling: str = "max_tokens = 16\n") -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[engine]\nmodel_path = "{MODEL_PATH}"\nn_ctx = 1024\nn_threads = 1\n'
        f"[sampling]\ntemperature = 0.0\n{sampling}"
        '[store]\npath = "chat.sqlite3"\n[web]\nport = 0\n'
    )
    return config


def llamarelay(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def stored(tmp_path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(tmp_path / "chat.sqlite3") as db:
        return db.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall()


def test_terminal_chat_answers_and_keeps_history(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = llamarelay(
        "--config", str(config), "chat", stdin="Hello there!\n/system Answer like a pirate.\n/system\n/quit\n"
    )
    assert result.returncode == 0, result.stderr
    assert "bot> " in result.stdout and "System prompt set." in result.stdout
    assert "System prompt: Answer like a pirate." in result.stdout and "Bye." in result.stdout
    rows = stored(tmp_path)
    assert rows[0] == ("user", "Hello there!", "complete")
    assert rows[1][0] == "assistant" and rows[1][2] == "complete" and rows[1][1] in result.stdout

    again = llamarelay("--config", str(config), "chat", stdin="/reset\n")
    assert "Conversation cleared." in again.stdout and stored(tmp_path) == []


def test_terminal_chat_picks_a_model_that_is_kept_over_a_restart_and_an_export(tmp_path: Path) -> None:
    config = write_config(tmp_path, sampling="max_tokens = 8\ngrammar = 'root ::= \"Ahoy.\"'\n")
    config.write_text(
        config.read_text() + f'[[models]]\nname = "second"\npath = "{MODEL_PATH}"\n'
        'description = "the same, loaded again"\n'
    )
    result = llamarelay("--config", str(config), "chat", stdin="/model\n/model gpt-9\n/model SECOND\nHello\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "/model [name]" in result.stdout
    assert f"uses `{MODEL_PATH.stem}`" in result.stdout and "• `second` — the same, loaded again" in result.stdout
    assert "There is no model called 'gpt-9'" in result.stdout
    assert "now uses `second`" in result.stdout and "🧠 second" in result.stdout  # the reply's footer
    with sqlite3.connect(tmp_path / "chat.sqlite3") as db:
        assert db.execute("SELECT role, content, model FROM messages ORDER BY id").fetchall() == [
            ("user", "Hello", ""),
            ("assistant", "Ahoy.", "second"),
        ]

    again = llamarelay("--config", str(config), "chat", stdin="/model\n")
    assert "This conversation uses `second`" in again.stdout
    exported = llamarelay("--config", str(config), "export", str(tmp_path / "out.jsonl"))
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()[1:]]
    assert [r["model"] for r in records] == ["second", "", "second"]  # the session's, then each message's


def test_run_without_tokens_in_a_terminal_starts_the_terminal_chat_and_says_how_to_connect(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    os.write(controller, b"Hi\n/quit\n")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bot", "--config", str(write_config(tmp_path)), "run"],
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert result.returncode == 0, result.stderr
    assert "DISCORD_TOKEN" in result.stderr and "SLACK_BOT_TOKEN" in result.stderr
    assert "bot> " in result.stdout
    assert "web chat on http://127.0.0.1:" in result.stderr  # the browser page runs beside it


async def test_run_as_a_service_serves_the_web_page_until_sigterm(tmp_path: Path) -> None:
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(write_config(tmp_path)),
        "run",
        env=ENV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert bot.stderr
    log = await read_until(bot.stderr, b"web chat on http://")
    assert b"starting the terminal chat" not in log
    bot.terminate()
    assert await asyncio.wait_for(bot.wait(), 30) == 0


def test_nothing_to_run_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("port = 0", "enabled = false"))
    result = llamarelay("--config", str(config), "run")
    assert result.returncode == 1 and "nothing to run" in result.stderr and "Traceback" not in result.stderr


def test_web_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path)
        config.write_text(config.read_text().replace("port = 0", f"port = {port}"))
        result = llamarelay("--config", str(config), "web")
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "[web] port" in result.stderr and "Traceback" not in result.stderr


def test_empty_line_gets_a_clear_answer(tmp_path: Path) -> None:
    result = llamarelay("--config", str(write_config(tmp_path)), "chat", stdin="   \n")
    assert "Your message is empty" in result.stdout


def test_missing_model_names_the_path_and_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[engine]\nmodel_path = "models/none.gguf"\n')
    result = llamarelay("--config", str(config), "chat")
    assert result.returncode == 1
    assert str(tmp_path / "models" / "none.gguf") in result.stderr and "llamarelay fetch-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_config_stops_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[sampling]\ntop_k = 'many'\n")
    result = llamarelay("--config", str(config), "run")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "sampling.top_k" in result.stderr


def test_fetch_model_keeps_an_existing_model(tmp_path: Path) -> None:
    result = llamarelay("--config", str(write_config(tmp_path)), "fetch-model")
    assert result.returncode == 0 and "already there" in result.stderr


LONG_REPLY = "max_tokens = 400\ngrammar = 'root ::= (\"la \" ){400}'\n"


async def start_chat(tmp_path: Path, config: Path | None = None) -> asyncio.subprocess.Process:
    """`llamarelay chat` with its input, output and errors on pipes (``config``: by default a long reply's)."""
    config = config or write_config(tmp_path, LONG_REPLY)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(config),
        "chat",
        env=ENV,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_until(stream: asyncio.StreamReader, marker: bytes, timeout: float = 60) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            chunk = await stream.read(256)
            if not chunk:
                raise AssertionError(f"output ended before {marker!r}: {seen[-300:]!r}")
            seen += chunk
    return seen


async def test_ctrl_c_stops_the_reply_not_the_program(tmp_path: Path) -> None:
    chat = await start_chat(tmp_path)
    assert chat.stdin and chat.stdout
    chat.stdin.write(b"sing\n")
    await read_until(chat.stdout, b"la la")
    chat.send_signal(signal.SIGINT)
    await read_until(chat.stdout, b"Stopped.")
    chat.stdin.write(b"/quit\n")
    await chat.stdin.drain()
    assert await asyncio.wait_for(chat.wait(), 30) == 0
    rows = stored(tmp_path)
    assert rows[-1][0] == "assistant" and rows[-1][2] == "stopped" and rows[-1][1].startswith("la la")


async def test_sigterm_shuts_down_cleanly_and_stores_the_partial_reply(tmp_path: Path) -> None:
    chat = await start_chat(tmp_path)
    assert chat.stdin and chat.stdout
    chat.stdin.write(b"sing\n")
    await read_until(chat.stdout, b"la la")
    chat.terminate()
    assert await asyncio.wait_for(chat.wait(), 30) == 0
    rows = stored(tmp_path)
    assert rows[0][:2] == ("user", "sing")
    assert rows[-1][0] == "assistant" and rows[-1][2] in ("stopped", "interrupted") and rows[-1][1]


@pytest.mark.parametrize("command", ["run", "chat", "web"])
def test_help_lists_the_commands(command: str) -> None:
    result = llamarelay("--help")
    assert result.returncode == 0 and command in result.stdout and "fetch-model" in result.stdout


async def start_service(tmp_path: Path, sampling: str = "max_tokens = 16\n") -> tuple[asyncio.subprocess.Process, str]:
    """`llamarelay run` as a service (no terminal, web page only); returns it and the page's URL."""
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "--config",
        str(write_config(tmp_path, sampling)),
        "run",
        env={**ENV, "LLAMARELAY_WEB_TOKEN": "t0ken"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert bot.stderr
    log = await read_until(bot.stderr, b"(access token required)")
    return bot, log.split(b"web chat on ")[1].split()[0].decode()


async def test_sigterm_ends_a_streaming_reply_within_docker_stops_deadline(tmp_path: Path) -> None:
    import aiohttp

    bot, url = await start_service(tmp_path, LONG_REPLY.replace("400", "900"))
    headers = {"Authorization": "Bearer t0ken"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(url + "api/conversations", json={}) as response:
            conversation = (await response.json())["id"]
        async with http.post(f"{url}api/conversations/{conversation}/messages", json={"text": "sing"}) as stream:
            await read_until(stream.content, b"la la")  # type: ignore[arg-type]
            started = asyncio.get_running_loop().time()
            bot.terminate()
            assert await asyncio.wait_for(bot.wait(), 10) == 0
            assert asyncio.get_running_loop().time() - started < 10  # `docker stop` would not have killed it
    reply = stored(tmp_path)[-1]
    assert reply[0] == "assistant" and reply[2] == "stopped" and reply[1].startswith("la la")


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    bot, _ = await start_service(tmp_path)
    bot.send_signal(signal.SIGTERM)
    bot.send_signal(signal.SIGINT)  # impatient: another Ctrl-C while it shuts down
    assert await asyncio.wait_for(bot.wait(), 10) == 1
    assert bot.stderr and b"second signal" in await bot.stderr.read()


@pytest.mark.parametrize(
    ("argv", "config", "verbose"),
    [
        (["chat", "--config", "a.toml"], "a.toml", False),
        (["--config", "a.toml", "chat"], "a.toml", False),
        (["chat", "-v"], None, True),
        (["-v", "web", "--config", "b.toml"], "b.toml", True),
        (["--config", "a.toml", "run", "--config", "b.toml"], "b.toml", False),  # the later one wins
    ],
)
def test_options_may_come_before_or_after_the_command(argv: list[str], config: str | None, verbose: bool) -> None:
    args = _parser().parse_args(argv)
    assert (args.config, args.verbose) == (Path(config) if config else None, verbose)


def test_config_option_after_the_command_is_used(tmp_path: Path) -> None:
    result = llamarelay("chat", "--config", str(write_config(tmp_path)), "-v", stdin="Hi\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "bot> " in result.stdout and stored(tmp_path)  # the store named in that file was used
    assert " DEBUG " in result.stderr


def only_log_lines_and(result: subprocess.CompletedProcess[str], last: str) -> None:
    """stderr is log lines and then ``last``: nothing written around the logging (no raw llama.cpp output)."""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(last), result.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line) for line in lines[:-1]), result.stderr


@pytest.mark.parametrize("command", ["run", "chat", "web"])
def test_invalid_grammar_stops_start_up_with_one_line(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path, 'grammar = \'root ::= ("yes" | "no"\'\n')
    result = llamarelay("--config", str(config), command, stdin="Hi\n")
    assert result.returncode == 1
    only_log_lines_and(result, "llamarelay: sampling.grammar is not valid GBNF: expecting ')'")
    assert "Traceback" not in result.stderr and "bot> " not in result.stdout


def test_parallel_above_n_batch_stops_start_up_instead_of_aborting(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("n_threads = 1\n", "n_threads = 1\nparallel = 32\nn_batch = 16\n"))
    result = llamarelay("--config", str(config), "chat")
    assert result.returncode == 1  # not 134: llama.cpp's GGML_ASSERT never runs
    assert result.stderr.strip() == (
        f"llamarelay: {config}: engine.parallel (32) must not exceed engine.n_batch (16): "
        "every conversation generated at once needs a place in each batch"
    )


# -- the terminal is left as it was found ----------------------------------------------------------------------


@pytest.mark.parametrize("leave", ["/quit", "end of input", "Ctrl-C", "SIGTERM"])
async def test_terminal_is_blocking_again_after_the_chat_ends(tmp_path: Path, leave: str) -> None:
    """asyncio makes stdin non-blocking, and that flag is shared with the shell: the next program would fail."""
    controller, terminal = pty.openpty()
    attributes = termios.tcgetattr(terminal)
    try:
        chat = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "chat",
            "--config",
            str(write_config(tmp_path)),
            env=ENV,
            stdin=terminal,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert chat.stdout
        await read_until(chat.stdout, b"you> ")
        assert not os.get_blocking(terminal)  # what asyncio does while the chat reads
        if leave == "/quit":
            os.write(controller, b"/quit\n")
        elif leave == "end of input":
            os.write(controller, b"\x04")  # Ctrl-D on an empty line
        else:
            chat.send_signal(signal.SIGINT if leave == "Ctrl-C" else signal.SIGTERM)
        assert await asyncio.wait_for(chat.wait(), 30) == 0
        assert os.get_blocking(terminal)
        assert termios.tcgetattr(terminal) == attributes
    finally:
        os.close(terminal)
        os.close(controller)


async def test_a_command_the_database_refuses_is_answered_and_the_chat_goes_on(
    manager: ConversationManager, settings: Settings
) -> None:
    settings.store.path.unlink()  # deleted under the running chat: nothing can be saved any more
    read, write = os.pipe()
    os.write(write, b"/system Be brief.\n/help\n/quit\n")
    os.close(write)
    out = io.StringIO()
    with open(read) as stdin:
        await asyncio.wait_for(run_console(manager, user="tester", stdin=stdin, out=out), 30)
    text = out.getvalue()
    refused = next(line for line in text.splitlines() if "was deleted or replaced" in line)
    assert str(settings.store.path) in refused and "System prompt set." not in text
    assert text.index(refused) < text.rindex(HELP)  # /help, after it, was answered
    assert text.endswith("\nBye.\n")


@pytest.mark.parametrize("leave", ["cancelled", "failed"])
async def test_terminal_is_restored_when_the_chat_is_cancelled_or_fails(
    manager: ConversationManager, leave: str
) -> None:
    controller, terminal = pty.openpty()
    out = io.StringIO()
    try:
        with open(terminal, closefd=False) as stdin:
            chat = asyncio.create_task(run_console(manager, user="tester", stdin=stdin, out=out))
            async with asyncio.timeout(10):
                while "you> " not in out.getvalue():
                    await asyncio.sleep(0.01)
            assert not os.get_blocking(terminal)
            if leave == "cancelled":  # what `llamarelay run` does when another adapter fails
                chat.cancel()
            else:  # the output has gone away: the chat fails with an exception
                out.close()
                os.write(controller, b"hello\n")
            with contextlib.suppress(asyncio.CancelledError, ValueError):
                await asyncio.wait_for(chat, 10)
            assert chat.done() and (chat.cancelled() or isinstance(chat.exception(), ValueError))
        assert os.get_blocking(terminal)
    finally:
        os.close(terminal)
        os.close(controller)


# -- a real terminal: keys, pastes, Ctrl-C and Ctrl-D as a user types them ----------------------------------

# As a shell starts a program: the terminal becomes its controlling terminal, so a typed Ctrl-C is SIGINT.
FROM_A_SHELL = "import os, sys; os.login_tty(0); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"


class Terminal:
    """`llamarelay chat` in a pseudo-terminal of its own (stdin, stdout and stderr), typed at through it."""

    def __init__(self, tmp_path: Path) -> None:
        self.controller, terminal = pty.openpty()
        self.attributes = termios.tcgetattr(terminal)
        self.process = subprocess.Popen(
            [sys.executable, "-c", FROM_A_SHELL, "-m", "bot", "chat", "--config", str(write_config(tmp_path))],
            stdin=terminal,
            env=ENV,
        )
        os.close(terminal)
        os.set_blocking(self.controller, False)

    def type(self, keys: bytes, *, until: bytes, timeout: float = 60) -> bytes:
        """Type ``keys`` (however long: the terminal is read meanwhile) and return what it shows until ``until``."""
        shown = bytearray()
        deadline = time.monotonic() + timeout
        while keys or until not in shown:
            left = deadline - time.monotonic()
            assert left > 0, f"the terminal never showed {until!r}: {bytes(shown[-500:])!r}"
            readable, writable, _ = select.select([self.controller], [self.controller] if keys else [], [], left)
            if readable:
                try:
                    shown += os.read(self.controller, 2**16)
                except OSError:  # EIO: every program on the terminal has closed it
                    raise AssertionError(f"the chat ended before {until!r}: {bytes(shown[-500:])!r}") from None
            if writable:
                keys = keys[os.write(self.controller, keys[:4096]) :]
        return bytes(shown)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:  # the test failed midway: the chat is still running
            self.process.kill()
        self.process.wait()
        os.close(self.controller)


def test_a_long_paste_arrives_whole_and_keys_edit_as_in_a_terminal(tmp_path: Path) -> None:
    """The kernel's line editor keeps 4,095 characters of a line; the chat reads keys itself, so nothing is cut."""
    with Terminal(tmp_path) as chat:
        chat.type(b"", until=b"you> ")
        paste = b"x" * 100_000
        shown = chat.type(paste + b"\r", until=b"you> ")  # Enter sends CR; the terminal makes it a newline
        assert paste in shown  # echoed whole
        chat.type(b"Hx\x7fi\r", until=b"you> ")  # Backspace
        chat.type(b"\x1b[200~one\rtwo\x1b[201~\r", until=b"you> ")  # a bracketed paste keeps its line break
        chat.type(b"\x04", until=b"Bye.")  # Ctrl-D on an empty line leaves
        assert chat.process.wait(30) == 0
        assert termios.tcgetattr(chat.controller) == chat.attributes  # the terminal is as it was
    users = [content for role, content, _ in stored(tmp_path) if role == "user"]
    assert [len(users[0]), users[1:]] == [100_000, ["Hi", "one\ntwo"]]


def test_ctrl_c_typed_at_the_prompt_leaves(tmp_path: Path) -> None:
    with Terminal(tmp_path) as chat:
        chat.type(b"", until=b"you> ")
        chat.type(b"half a li\x03", until=b"Bye.")
        assert chat.process.wait(30) == 0
        assert termios.tcgetattr(chat.controller) == chat.attributes
    assert stored(tmp_path) == []


# -- bad settings: one line naming the key or variable and the value --------------------------------------------


def test_a_list_variable_that_is_not_json_is_one_line_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(write_config(tmp_path)), "chat"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**ENV, "LLAMARELAY_DISCORD__GUILD_IDS": "notjson"},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "LLAMARELAY_DISCORD__GUILD_IDS" in result.stderr and "'notjson'" in result.stderr
    assert "JSON list" in result.stderr


@pytest.mark.parametrize(
    ("section", "line", "shown"),
    [
        (
            "store",
            'url = "mysql://bot:s3cret@db/chat"',
            "'store.url' = 'mysql://bot:***@db/chat' is invalid: must be a postgresql:// URL",
        ),
        (
            "engine",
            'backend = "openai"\nbase_url = "ftp://x"',
            "'engine.base_url' = 'ftp://x' is invalid: must be an http:// or https:// URL",
        ),
    ],
)
def test_a_wrong_url_names_the_key_and_the_value(tmp_path: Path, section: str, line: str, shown: str) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace(f"[{section}]\n", f"[{section}]\n{line}\n"))
    result = llamarelay("--config", str(config), "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"llamarelay: {config}: {shown}") and result.stderr.count("\n") == 1
    assert "s3cret" not in result.stderr


def test_a_database_url_variable_that_is_not_postgresql_is_refused_not_a_file_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--config", str(write_config(tmp_path)), "migrate"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # where a file would go
        env={
            **ENV,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
            "LLAMARELAY_DATABASE_URL": "mysql://bot:s3cret@db/chat",
        },
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "llamarelay: environment variable LLAMARELAY_DATABASE_URL = "
        "'mysql://bot:***@db/chat' is invalid: must be a postgresql:// URL"
    )
    assert "s3cret" not in result.stderr and list(tmp_path.iterdir()) == [tmp_path / "config.toml"]


async def test_an_unwritable_state_dir_is_a_warning_at_start_up(tmp_path: Path) -> None:
    """Told when the bot starts, not at the first save; the bot runs on without the disk cache."""
    (tmp_path / "afile").write_text("a file, so no folder can be made under it (even by root)")
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace("[engine]\n", '[engine]\nstate_dir = "afile/states"\n'))
    chat = await start_chat(tmp_path, config)
    assert chat.stdin and chat.stdout and chat.stderr
    await read_until(chat.stdout, b"you> ")  # started, nothing said yet: no state saved
    async with asyncio.timeout(10):  # the log of the start-up is written by now
        while b"state_dir" not in (line := await chat.stderr.readline()):
            assert line, "the log ended"
    assert b" WARNING " in line
    assert f"[engine] state_dir = '{tmp_path / 'afile' / 'states'}' is not writable".encode() in line
    chat.stdin.write(b"Hi\n/quit\n")
    await chat.stdin.drain()
    assert await asyncio.wait_for(chat.wait(), 60) == 0
    rest = await chat.stderr.read()
    assert b"state_dir" not in rest and b"KV state" not in rest  # no complaint per save: it was not tried
    assert stored(tmp_path)[-1][0] == "assistant"  # it answered all the same
