"""The `llamarelay` command line: logging with secrets redacted, the subcommands, and the database chores
(migrate, export, import). Serving is `bot.app.serve`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bot.app import serve
from bot.config import DEFAULT_CONFIG_PATH, Secrets, Settings, load_settings
from bot.default_model import fetch_default_model
from bot.errors import LlamarelayError
from bot.store import is_database_url, open_store, redact_url
from bot.store.transfer import export_jsonl, import_jsonl

__all__ = ["COMMANDS", "RedactingFormatter", "main", "manage_store", "setup_logging"]


class RedactingFormatter(logging.Formatter):
    """Formats log records with every known secret replaced, tracebacks included."""

    def __init__(self, fmt: str, secrets: list[str]) -> None:
        super().__init__(fmt)
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def setup_logging(secrets: Secrets, *, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", secrets.values()))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if not verbose:  # llama.cpp's loader chatter is only useful when debugging
        logging.getLogger("llama_cpp").setLevel(logging.WARNING)
    # Even with -v: aiosqlite's debug lines print every SQL parameter (browser ids, what users wrote).
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # The MCP SDK's HTTP client logs each request (tool calls, pings) at INFO.
    logging.getLogger("httpx2").setLevel(logging.WARNING)


def _describe_target(target: Path | str) -> str:
    return redact_url(target) if is_database_url(target) else str(target)


async def manage_store(settings: Settings, command: str, file: Path | None = None) -> None:
    """``migrate``, ``export FILE`` or ``import FILE`` on the configured database, printing what was done."""
    target = settings.store.target()
    store = await open_store(target, migrate=command != "migrate")
    try:
        if command == "migrate":
            current = await store.schema_version()
            print(f"database: {_describe_target(target)}\nschema version: {current} (latest: {store.latest_version})")
            applied = await store.migrate()
            print(f"applied migrations: {', '.join(map(str, applied))}" if applied else "up to date")
        elif command == "export":
            assert file is not None
            sessions, messages = await export_jsonl(store, file)
            print(f"exported {sessions} conversations, {messages} messages to {file}")
        else:
            assert file is not None
            sessions, messages = await import_jsonl(store, file)
            print(f"imported {sessions} conversations, {messages} messages into {_describe_target(target)}")
    finally:
        await store.close()


COMMANDS = {
    "run": "start every adapter that has a token (the terminal chat when none has)",
    "chat": "chat with the model in this terminal",
    "web": "serve only the browser chat page ([web] host and port)",
    "fetch-model": "download the default model into the configured model_path",
    "migrate": "show the database's schema version and apply pending migrations",
    "export": "write every conversation to FILE (JSON lines)",
    "import": "load every conversation from FILE (made by export) into an empty database",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamarelay", description="A local LLM chat bot for Discord and Slack.")
    _add_common_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        # Users type options after the command too (`llamarelay chat --config FILE`).
        command = commands.add_parser(name, help=help_text)
        _add_common_options(command, defaults=False)
        if name in ("export", "import"):
            command.add_argument("file", type=Path, metavar="FILE")
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--config and -v; on a subcommand without defaults, so an option given before it is not overwritten."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None if defaults else argparse.SUPPRESS,
        help=f"config file (default: ./{DEFAULT_CONFIG_PATH}, or built-in defaults if absent)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=False if defaults else argparse.SUPPRESS, help="debug logging"
    )


def _load(config: Path | None) -> Settings:
    if config is None and not DEFAULT_CONFIG_PATH.is_file():
        return load_settings(None)  # the defaults, with the environment's overrides
    return load_settings(config or DEFAULT_CONFIG_PATH)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    secrets = Secrets.from_env()
    setup_logging(secrets, verbose=args.verbose)
    try:
        settings = _load(args.config)
        if args.command == "fetch-model":
            fetch_default_model(settings.engine.model_path)
        elif args.command in ("migrate", "export", "import"):
            asyncio.run(manage_store(settings, args.command, getattr(args, "file", None)))
        else:
            asyncio.run(serve(settings, secrets, mode=args.command))
    except LlamarelayError as exc:
        print(f"llamarelay: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
