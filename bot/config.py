"""Settings: config.toml validated by pydantic, each key overridable from the environment; secrets from
their own environment variables only.

``LLAMARELAY_<SECTION>__<KEY>`` overrides ``[section] key`` (e.g. ``LLAMARELAY_WEB__HOST=0.0.0.0``; lists as
JSON, ``LLAMARELAY_DISCORD__GUILD_IDS=[1,2]``): pydantic-settings reads them, the file stays the base.

Over 400 lines: declarations only, one pydantic section per config.toml table, so that each key is
documented once where it is defined.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from bot.errors import ConfigError
from bot.store import redact_url

__all__ = [
    "Settings",
    "EngineSettings",
    "ModelSettings",
    "ModelPoolSettings",
    "ImageSettings",
    "SamplingSettings",
    "ConversationSettings",
    "StoreSettings",
    "StreamingSettings",
    "DiscordSettings",
    "SlackSettings",
    "WebSettings",
    "OpsSettings",
    "ApiSettings",
    "ToolGrant",
    "ToolOptions",
    "ToolServerSettings",
    "ToolsSettings",
    "Secrets",
    "load_settings",
]

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("config.toml")
ENV_PREFIX = "LLAMARELAY_"
ENV_NESTED_DELIMITER = "__"
SECRET_ENV_VARS = (
    "DISCORD_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
    "SLACK_SIGNING_SECRET",
    "LLAMARELAY_WEB_TOKEN",
    "LLAMARELAY_DATABASE_URL",
    "LLAMARELAY_ENGINE_API_KEY",
    "LLAMARELAY_API_TOKEN",
)

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _model_name(name: str | None) -> str | None:
    if name is not None and not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit "
            "(users type it after /model)"
        )
    return name


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineSettings(_Section):
    name: str | None = Field(
        None,
        description="the name users pick this model by (/model); unset = the remote "
        "model's id, else the GGUF file's name",
    )
    backend: Literal["embedded", "openai"] = Field(
        "embedded", description="embedded: llama.cpp in this process; openai: an OpenAI-compatible server"
    )
    model_path: Path = Field(Path("models/SmolLM2-135M-Instruct.Q4_1.gguf"), description="GGUF model file")
    mmproj: Path | None = Field(None, description="the GGUF's multimodal projector: the model reads images")
    n_ctx: int = Field(4096, ge=256, le=131072, description="context window of one conversation, in tokens")
    n_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="CPU threads; 0 = timed: every physical core, one less and half are tried, and the fastest kept",
    )
    n_batch: int = Field(512, ge=16, le=8192, description="most tokens decoded in one llama_decode call")
    kv_pool_mb: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="memory for the KV cache of all conversations; 0 = room for 8 x n_ctx "
        "tokens (4 x where that is over a quarter of the RAM)",
    )
    kv_layout: Literal["auto", "streams", "pool"] = Field(
        "auto",
        description="streams: a KV stream of a whole window per conversation generating; pool: one pool "
        "they all share; auto: streams where kv_pool_mb holds 8 windows",
    )
    parallel: int = Field(0, ge=0, le=64, description="most conversations generated together; 0 = automatic")
    step_budget_ms: int = Field(
        100, ge=5, le=60_000, description="decode step while replies stream: prompt chunks are sized to it"
    )
    prefill_chunk: int = Field(
        16, ge=1, le=8192, description="fewest prompt tokens read per step while other replies generate"
    )
    state_cache_mb: int = Field(
        256, ge=0, le=1_000_000, description="RAM for KV caches of conversations whose slot was reused"
    )
    max_queue: int = Field(32, ge=1, le=10000, description="requests that may wait; more are refused")
    state_dir: Path | None = Field(
        None,
        description="folder for KV states the RAM cache has no room for, and of "
        "recent conversations across restarts; a config file's default is kv/ beside "
        "[store] path",
    )
    state_disk_mb: int = Field(
        1024, ge=0, le=10_000_000, description="disk for those KV states, newest kept; 0 = none saved"
    )
    n_gpu_layers: int = Field(
        -1,
        description="model layers llama.cpp puts on the GPU: -1 = all (where the build "
        "has GPU support), 0 = none (CPU only)",
    )
    main_gpu: int | None = Field(
        None,
        ge=0,
        le=255,
        description="the one GPU (0, 1, …) that holds the model; unset = llama.cpp splits the layers over every GPU",
    )
    # backend = "openai": the server's API key comes from LLAMARELAY_ENGINE_API_KEY, never from the file.
    base_url: str | None = Field(None, description="the server's OpenAI API root, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(None, description="model name to ask the server for; unset = the server's first")
    vision: bool = Field(False, description="the server's model reads images (they go as image_url parts)")
    max_requests: int = Field(8, ge=1, le=1024, description="most requests in flight at the server at once")
    connect_timeout: float = Field(5.0, gt=0, le=600, description="seconds to wait for a connection")
    read_timeout: float = Field(
        120.0, gt=0, le=3600, description="seconds the server may stay silent (prompt reading included)"
    )
    retry_seconds: float = Field(
        60.0, ge=0, le=3600, description="how long an unreachable or failing server is retried for a reply"
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1")
        return url

    _name = field_validator("name")(_model_name)

    @field_validator("n_gpu_layers")
    @classmethod
    def _layers(cls, n: int) -> int:
        if not -1 <= n <= 100_000:
            raise ValueError("must be -1 (every layer on the GPU), 0 (CPU only) or a number of layers")
        return n

    @model_validator(mode="after")
    def _fits_llama_cpp(self) -> EngineSettings:
        # llama.cpp would abort the whole process (GGML_ASSERT) on this rather than return an error.
        if self.backend == "openai" and not self.base_url:
            raise ValueError('engine.backend = "openai" needs engine.base_url (e.g. http://127.0.0.1:8080/v1)')
        if self.vision and self.backend != "openai":
            raise ValueError(
                'engine.vision = true is for a server model (backend = "openai"); an embedded model '
                "reads images through its mmproj ([engine] mmproj)"
            )
        if self.parallel > self.n_batch:
            raise ValueError(
                f"engine.parallel ({self.parallel}) must not exceed engine.n_batch ({self.n_batch}): "
                "every conversation generated at once needs a place in each batch"
            )
        return self


class ModelSettings(_Section):
    """One ``[[models]]`` entry: a GGUF run here (``path``) or a model on an OpenAI-compatible server (``url``).

    What it leaves out comes from ``[engine]`` (threads, batch, queue, timeouts…); secrets come from the
    environment variable ``api_key_env`` names, never from the file.
    """

    name: str = Field(description="what users pick it by with /model")
    description: str = Field("", max_length=100, description="one line shown beside the name in /model")
    path: Path | None = Field(None, description="an embedded GGUF model file")
    mmproj: Path | None = Field(None, description="the GGUF's multimodal projector, for image input")
    n_gpu_layers: int | None = Field(None, ge=-1, le=100_000, description="unset = [engine] n_gpu_layers")
    kv_pool_mb: int | None = Field(None, ge=0, le=1_000_000, description="unset = [engine] kv_pool_mb")
    url: str | None = Field(None, description="an OpenAI-compatible server's API root, e.g. http://127.0.0.1:8080/v1")
    model: str | None = Field(None, description="the model id the server is asked for; unset = the server's first")
    api_key_env: str | None = Field(None, description="environment variable that holds the server's API key")
    n_ctx: int | None = Field(None, ge=256, le=1_048_576, description="context window; unset = [engine] n_ctx")
    vision: bool | None = Field(None, description="reads images; unset = detected (an embedded model: mmproj set)")
    tools: bool | None = Field(None, description="calls tools; unset = detected from its chat template")
    image_size: int = Field(1024, ge=64, le=8192, description="longest side, in pixels, images are scaled to")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8080/v1")
        return url

    _name = field_validator("name")(_model_name)

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, name: str | None) -> str | None:
        # A key pasted here by mistake is refused before it can reach a log line (the message hides it).
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError(
                "must name an environment variable (letters, digits, _), e.g. OPENAI_API_KEY; "
                "the key itself goes in that variable, never in the file"
            )
        return name

    @model_validator(mode="after")
    def _one_backend(self) -> ModelSettings:
        if (self.path is None) == (self.url is None):
            raise ValueError(
                f"model {self.name!r} needs either path (a GGUF file) or url (a server), not "
                f"{'both' if self.path else 'neither'}"
            )
        if self.url is not None and (self.mmproj or self.n_gpu_layers is not None or self.kv_pool_mb is not None):
            raise ValueError(
                f"model {self.name!r} is on a server (url): mmproj, n_gpu_layers and kv_pool_mb "
                "belong to an embedded model (path)"
            )
        if self.path is not None and (self.model or self.api_key_env):
            raise ValueError(
                f"model {self.name!r} is embedded (path): model and api_key_env belong to a server model (url)"
            )
        if self.path is not None and self.vision and self.mmproj is None:
            raise ValueError(f"model {self.name!r}: vision = true needs mmproj, the GGUF's multimodal projector")
        return self

    @property
    def backend(self) -> Literal["embedded", "openai"]:
        return "embedded" if self.path is not None else "openai"


class ModelPoolSettings(_Section):
    memory_mb: int = Field(
        8192,
        ge=0,
        le=10_000_000,
        description="RAM (or VRAM) for embedded models loaded at "
        "once, weights and KV pool; the least recently used idle ones are unloaded to make room",
    )
    idle_seconds: float = Field(
        900.0,
        ge=0,
        le=604_800,
        description="an embedded model other than the default "
        "is unloaded after this long unused; 0 = only to make room",
    )


class ImageSettings(_Section):
    max_bytes: int = Field(
        10_000_000, ge=0, le=100_000_000, description="larger image files are skipped, with a note, before any download"
    )
    max_count: int = Field(4, ge=0, le=32, description="images read from one message; the rest are skipped")
    max_pixels: int = Field(
        40_000_000,
        ge=1,
        le=150_000_000,  # Pillow refuses past 178 M whatever we allow
        description="images with more pixels are skipped (decompression bombs)",
    )
    disk_mb: int = Field(
        1024, ge=0, le=10_000_000, description="stored images, newest kept; older ones are replaced by a note"
    )


class SamplingSettings(_Section):
    max_tokens: int = Field(512, ge=1, le=32768, description="longest reply in tokens")
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=1000)
    repeat_penalty: float = Field(1.1, gt=0.0, le=5.0, description="1.0 = off; above 1.0 discourages repeats")
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: less of a token the more often it appeared (0 = off)"
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="OpenAI's: less of any token that appeared (0 = off)"
    )
    seed: int = Field(-1, ge=-1, le=0xFFFFFFFE, description="-1 = a new random seed per reply")
    ignore_eos: bool = Field(
        False,
        description="write on past the end of the turn up to max_tokens (benchmarks, as llama-server's ignore_eos)",
    )
    grammar: str | None = Field(None, description="GBNF grammar every reply must follow (optional)")


class ConversationSettings(_Section):
    system_prompt: str = Field("You are a helpful assistant.", max_length=20000)
    max_message_chars: int = Field(
        50000, ge=100, le=1_000_000, description="longer messages are stored whole but cut for the model"
    )
    max_waiting: int = Field(
        5, ge=0, le=1000, description="messages that may wait behind a conversation's running reply"
    )
    max_file_bytes: int = Field(
        200_000, ge=0, le=10_000_000, description="text files larger than this are skipped, with a note"
    )
    show_reasoning: Literal["hidden", "quoted"] = Field(
        "hidden", description="a reasoning model's thinking: a status line only, or quoted above the answer"
    )
    summarize_messages: int = Field(50, ge=1, le=1000, description="messages a Summarize command reads")
    summarize_chars: int = Field(12000, ge=500, le=1_000_000, description="most characters of them it keeps")


DATABASE_URL_ENV = "LLAMARELAY_DATABASE_URL"


class StoreSettings(_Section):
    path: Path = Field(Path("data/llamarelay.sqlite3"), description="SQLite database file (when no url is set)")
    url: str | None = Field(
        None,
        description="postgresql://user@host/db selects PostgreSQL; the password "
        f"belongs in {DATABASE_URL_ENV}, which overrides this",
    )
    reply_lease: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description="seconds a reply in progress stays its process's without word from it; "
        "then another process on the database marks it interrupted",
    )

    @field_validator("url")
    @classmethod
    def _postgresql(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (leave it out for SQLite)")
        return url

    def target(self, environ: Mapping[str, str] | None = None) -> Path | str:
        """Where the store lives: the URL in LLAMARELAY_DATABASE_URL, else ``url``, else the SQLite ``path``.
        A variable that is not a postgresql:// URL raises ConfigError (never read as a file name)."""
        env = os.environ if environ is None else environ
        url = env.get(DATABASE_URL_ENV)
        if url and not url.startswith(("postgresql://", "postgres://")):  # else it would name an SQLite file
            raise ConfigError(
                f"environment variable {DATABASE_URL_ENV} = {redact_url(url)!r} is invalid: must be a "
                "postgresql:// URL (leave it unset for SQLite)"
            )
        return url or self.url or self.path


class StreamingSettings(_Section):
    """Deprecated: its one key only ever paced the web page, so it is ``[web] edit_interval`` now. A config that
    still sets it works as before (it stands in for an unset ``[web] edit_interval``), with a warning."""

    edit_interval: float | None = Field(None, ge=0.0, le=60.0, description="deprecated: [web] edit_interval")


class DiscordSettings(_Section):
    allowed_guild_ids: list[int] = Field(default_factory=list, description="empty = every guild")
    allowed_channel_ids: list[int] = Field(default_factory=list, description="empty = every channel")
    allowed_role_ids: list[int] = Field(default_factory=list, description="empty = every role")
    allowed_user_ids: list[int] = Field(default_factory=list, description="empty = every user")
    admin_user_ids: list[int] = Field(default_factory=list, description="may set /system anywhere")
    always_answer_channel_ids: list[int] = Field(default_factory=list, description="answer without a mention")
    guild_ids: list[int] = Field(default_factory=list, description="sync slash commands to these guilds only")
    dms_enabled: bool = True
    answer_bots: bool = False
    answer_in_threads: bool = True
    thread_per_conversation: bool = Field(
        False,
        description="a mention in a channel opens a thread for the conversation; follow-ups there need no mention",
    )
    edit_interval: float = Field(1.0, ge=0.2, le=60.0, description="seconds between edits of one message")
    user_messages_per_minute: int = Field(10, ge=0, le=10000, description="0 = unlimited")
    api_base_url: str | None = Field(None, description="REST base, e.g. https://discord.com/api/v10")
    gateway_url: str | None = Field(None, description="gateway websocket, e.g. wss://gateway.discord.gg/")
    shard_count: int | None = Field(
        None,
        ge=1,
        le=100000,
        description="gateway shards of the whole bot, split among its processes; none = one process, one connection",
    )
    shard_ids: list[int] = Field(
        default_factory=list, description="the shards this process connects (with shard_count); empty = all of them"
    )

    @model_validator(mode="after")
    def _shards_fit(self) -> DiscordSettings:
        if self.shard_ids and self.shard_count is None:
            raise ValueError("discord.shard_ids needs discord.shard_count: the shards of the whole bot")
        if any(not 0 <= shard < (self.shard_count or 0) for shard in self.shard_ids):
            raise ValueError(f"discord.shard_ids must lie in 0..{(self.shard_count or 1) - 1} (shard_count - 1)")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("discord.shard_ids names a shard twice")
        return self


class SlackSettings(_Section):
    allowed_channel_ids: list[str] = Field(default_factory=list, description="empty = every channel")
    allowed_user_ids: list[str] = Field(default_factory=list, description="empty = every user")
    admin_user_ids: list[str] = Field(default_factory=list, description="may set /system")
    dms_enabled: bool = True
    reply_in_thread: bool = True
    edit_interval: float = Field(1.0, ge=0.2, le=60.0, description="seconds between chat.update calls")
    native_streaming: bool = False
    user_messages_per_minute: int = Field(10, ge=0, le=10000, description="0 = unlimited")
    http_host: str = "127.0.0.1"
    http_port: int = Field(3000, ge=0, le=65535, description="0 = any free port")
    http_path: str = "/slack/events"
    api_base_url: str | None = Field(None, description="Web API base, e.g. https://slack.com/api/")


class WebSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    trust_forwarded_proto: bool = Field(
        False, description="behind a TLS-terminating proxy: its X-Forwarded-Proto: https marks cookies Secure"
    )
    edit_interval: float = Field(
        1.0,
        ge=0.0,
        le=60.0,
        description="seconds between updates of a reply streamed "
        "to the page ([discord] and [slack] have their own edit_interval)",
    )


class OpsSettings(_Section):
    enabled: bool = Field(False, description="serve /healthz, /readyz and /metrics (the Docker image does)")
    host: str = Field(
        "127.0.0.1", description="the endpoints tell about the bot's load: keep them on loopback or a private network"
    )
    port: int = Field(9090, ge=0, le=65535, description="0 = any free port")


class ApiSettings(_Section):
    enabled: bool = Field(False, description="serve the OpenAI-compatible /v1/chat/completions and /v1/models")
    host: str = Field("127.0.0.1", description="anything but loopback requires LLAMARELAY_API_TOKEN")
    port: int = Field(8081, ge=0, le=65535, description="0 = any free port")


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ToolOptions(_Section):
    confirm: bool = Field(False, description="ask the user (Run / Deny) before each call of this tool")
    title: str | None = Field(
        None,
        max_length=100,
        description="what the status line says while it runs, e.g. "
        "'Searching the wiki'; unset = the server's title for the tool",
    )


class ToolServerSettings(_Section):
    name: str = Field(description="the server's name in logs, /status and metrics (letters, digits, _ and -)")
    # stdio: a command line the bot starts and stops.
    command: str | None = Field(None, description="program that runs a stdio MCP server")
    args: list[str] = Field(default_factory=list, description="its arguments")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for it")
    # streamable HTTP: a server that runs elsewhere.
    url: str | None = Field(None, description="a streamable-HTTP MCP server's endpoint, e.g. http://127.0.0.1:8000/mcp")
    auth_env: str | None = Field(
        None, description="environment variable holding the token sent in auth_header (never the token itself)"
    )
    auth_header: str = Field("Authorization", min_length=1, max_length=100, description="header the token goes in")
    auth_scheme: str = Field("Bearer", max_length=50, description="word before the token; empty = the token alone")
    tools: dict[str, ToolOptions] = Field(default_factory=dict, description="per-tool options, by the tool's name")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError("must be 1 to 64 letters, digits, _ or -")
        return name

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/mcp")
        return url

    @field_validator("auth_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.fullmatch(name):
            raise ValueError("must name an environment variable (e.g. WIKI_MCP_TOKEN), not hold the token")
        return name

    @model_validator(mode="after")
    def _one_transport(self) -> ToolServerSettings:
        if (self.command is None) == (self.url is None):
            raise ValueError(
                f"tool server '{self.name}' needs either command (a stdio server) or url "
                "(a streamable-HTTP server), not both"
            )
        if self.url is None and self.auth_env is not None:
            raise ValueError(
                f"tool server '{self.name}': auth_env is for a url; pass a stdio server its token through env"
            )
        if self.command is None and (self.args or self.env):
            raise ValueError(f"tool server '{self.name}': args and env are for a command; a url server takes none")
        return self


class ToolGrant(_Section):
    """One ``[[tools.allow]]`` grant; `bot.access.AccessPolicy.tools_for` matches them."""

    places: list[str] = Field(
        min_length=1,
        description="conversations, as session-key patterns: "
        "'discord/ch/<server>/*' a whole server, 'discord/ch/<server>/<channel>*' a channel "
        "and its threads, 'slack/ch/<workspace>/*', 'discord/dm/*', 'web/*'",
    )
    users: list[str] = Field(
        default_factory=list,
        description="only these user ids there (or the roles below); users and roles both empty = everyone",
    )
    roles: list[str] = Field(
        default_factory=list, description="only members with one of these Discord role ids there (or the users above)"
    )
    tools: list[str] = Field(default_factory=lambda: ["*"], description="tool names (patterns); '*' = every tool")

    @field_validator("places")
    @classmethod
    def _key_patterns(cls, places: list[str]) -> list[str]:
        for place in places:
            if "/" not in place and place != "*":
                raise ValueError(
                    f"'{place}' is not a session-key pattern: write e.g. 'discord/ch/<server id>/*' or 'web/*'"
                )
        return places

    @field_validator("users", "roles", mode="before")
    @classmethod
    def _ids_as_text(cls, ids: Any) -> Any:
        """Ids may be written as TOML integers (Discord's snowflakes); they are matched as text."""
        return (
            [str(i) if isinstance(i, int) and not isinstance(i, bool) else i for i in ids]
            if isinstance(ids, list)
            else ids
        )

    @field_validator("roles")
    @classmethod
    def _role_ids(cls, roles: list[str]) -> list[str]:
        for role in roles:
            if not role.isdigit():
                raise ValueError(
                    f"'{role}' is not a role id: write the role's number (Discord: Server Settings, "
                    "Roles, right-click the role, Copy Role ID)"
                )
        return roles


class ToolsSettings(_Section):
    servers: list[ToolServerSettings] = Field(default_factory=list, description="MCP servers; none = no tools")
    allow: list[ToolGrant] = Field(
        default_factory=list,
        description="which places (and users or roles) may use which tools; none = no place may (tools are opt-in)",
    )
    max_rounds: int = Field(4, ge=1, le=50, description="most rounds of tool calls in one reply")
    call_timeout: float = Field(30.0, gt=0, le=3600, description="seconds one tool call may take")
    approval_timeout: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="seconds a confirm = true call waits for "
        "Run / Deny before it is dropped (the model is told it did not run)",
    )
    max_result_chars: int = Field(
        8000, ge=100, le=1_000_000, description="a longer tool result is cut to this, with a note"
    )
    restart_delay: float = Field(
        1.0,
        gt=0,
        le=600,
        description="seconds before restarting a server that died; doubled after each failure in a row",
    )
    max_restart_delay: float = Field(60.0, gt=0, le=3600, description="the longest wait between restarts")
    check_interval: float = Field(15.0, gt=0, le=3600, description="seconds between pings of a quiet server")

    @model_validator(mode="after")
    def _unique_names(self) -> ToolsSettings:
        names = [server.name for server in self.servers]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"tools.servers names '{twice[0]}' twice: each server needs its own name")
        return self


class Settings(BaseSettings):
    """Every section; ``Settings()`` is the defaults with the environment's overrides applied."""

    # A misspelt key (in the file or after LLAMARELAY_) is an error, not a silently ignored setting.
    model_config = SettingsConfigDict(
        extra="forbid", validate_assignment=True, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    conversation: ConversationSettings = Field(default_factory=ConversationSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    slack: SlackSettings = Field(default_factory=SlackSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    models: list[ModelSettings] = Field(default_factory=list, description="models besides [engine], the default")
    model_pool: ModelPoolSettings = Field(default_factory=ModelPoolSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed in as init values); no .env or secrets-dir files.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _streaming_is_web(self) -> Settings:
        """``[streaming] edit_interval`` (deprecated) stands in for an unset ``[web] edit_interval``."""
        if self.streaming.edit_interval is not None:
            log.warning(
                "[streaming] edit_interval is deprecated: it is [web] edit_interval now (only the web page "
                "ever read it)"
            )
            if "edit_interval" not in self.web.model_fields_set:
                self.web.edit_interval = self.streaming.edit_interval
        return self

    @model_validator(mode="after")
    def _reply_fits_the_window(self) -> Settings:
        if self.sampling.max_tokens >= self.engine.n_ctx:
            raise ValueError(
                f"sampling.max_tokens ({self.sampling.max_tokens}) must be below engine.n_ctx "
                f"({self.engine.n_ctx}): the prompt needs room too"
            )
        if self.api.enabled and self.engine.backend == "openai":
            raise ValueError(
                '[api] serves the embedded engine; with engine.backend = "openai" point API clients '
                "at the model server itself"
            )
        seen = {default_model_name(self.engine).lower(): "[engine]"}
        for index, model in enumerate(self.models):
            if (first := seen.setdefault(model.name.lower(), f"models[{index}]")) != f"models[{index}]":
                raise ValueError(
                    f"models[{index}]: the name {model.name!r} is taken by {first}; each model needs a name of its own"
                )
            n_ctx = model.n_ctx or self.engine.n_ctx
            if self.sampling.max_tokens >= n_ctx:
                raise ValueError(
                    f"models[{index}] ({model.name!r}): sampling.max_tokens ({self.sampling.max_tokens})"
                    f" must be below its n_ctx ({n_ctx}): the prompt needs room too"
                )
        return self


def default_model_name(engine: EngineSettings) -> str:
    """What users call the ``[engine]`` model: its ``name``, else the server's model id, else the GGUF's stem."""
    if engine.name:
        return engine.name
    if engine.backend == "openai":
        return engine.model or "default"
    return engine.model_path.stem


@dataclass(frozen=True, repr=False)
class Secrets:
    """Tokens read from the environment; never printed (repr hides them)."""

    discord_token: str | None = None
    slack_bot_token: str | None = None
    slack_app_token: str | None = None
    slack_signing_secret: str | None = None
    web_token: str | None = None
    database_url: str | None = None
    engine_api_key: str | None = None
    api_token: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Secrets:
        env = os.environ if environ is None else environ
        values = [env.get(name) or None for name in SECRET_ENV_VARS]
        return cls(*values)

    def values(self) -> list[str]:
        """Every secret string, for redaction: a database URL's password on its own too."""
        password = urlsplit(self.database_url).password if self.database_url else None
        return [
            v
            for v in (
                self.discord_token,
                self.slack_bot_token,
                self.slack_app_token,
                self.slack_signing_secret,
                self.web_token,
                self.database_url,
                password,
                self.engine_api_key,
                self.api_token,
            )
            if v
        ]

    def __repr__(self) -> str:
        return "Secrets(<hidden>)"


def load_settings(path: Path | str | None = DEFAULT_CONFIG_PATH) -> Settings:
    """Read and validate a config file (None: the defaults), then the environment's overrides; any problem
    raises ConfigError with one clear line."""
    if path is None:
        return _validate({}, "settings")
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (use --config PATH to pick another)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    settings = _validate(raw, str(path))
    # Relative paths in the file mean "next to this file", wherever the bot is started from.
    settings.engine.model_path = path.parent / settings.engine.model_path
    settings.engine.mmproj = path.parent / settings.engine.mmproj if settings.engine.mmproj is not None else None
    settings.store.path = path.parent / settings.store.path
    for model in settings.models:
        model.path = path.parent / model.path if model.path is not None else None
        model.mmproj = path.parent / model.mmproj if model.mmproj is not None else None
    settings.engine.state_dir = (
        path.parent / settings.engine.state_dir
        if settings.engine.state_dir is not None
        else settings.store.path.parent / "kv"
    )
    return settings


def _validate(raw: dict[str, Any], origin: str) -> Settings:
    try:
        return Settings(**raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        variable = env_variable(error["loc"])
        if variable in {name.upper() for name in os.environ}:  # the value came from the environment: say so
            origin = f"environment variable {variable}"
        raise ConfigError(f"{origin}: {_describe(error)}") from None
    except SettingsError as exc:  # a list variable that is not JSON: pydantic-settings names only the section
        raise ConfigError(_bad_json_variable() or f"environment: {exc}") from None


def _bad_json_variable() -> str | None:
    """One line naming the LLAMARELAY_ variable whose list value is not valid JSON, if one is."""
    for name, value in os.environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition(ENV_NESTED_DELIMITER)
        model = Settings.model_fields[section].annotation if section in Settings.model_fields else None
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None or get_origin(field.annotation) is not list:
            continue
        try:
            json.loads(value)
        except ValueError:
            example = "[123, 456]" if get_args(field.annotation) == (int,) else '["C012AB3CD"]'
            return (
                f"environment variable {name}: '{section}.{key}' = {value!r} is invalid: "
                f"must be a JSON list, e.g. {example}"
            )
    return None


def env_variable(loc: tuple[Any, ...] | list[Any]) -> str:
    """The environment variable that sets the key at ``loc``: ('web', 'host') -> LLAMARELAY_WEB__HOST."""
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(part) for part in loc).upper()


def _describe(error: Any) -> str:
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]).lstrip(".")
    if error["type"] == "extra_forbidden":
        return f"unknown setting '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if len(error["loc"]) < 2 or isinstance(error["loc"][-1], int):  # a rule across keys: its message names them
        return message if len(error["loc"]) < 2 else f"{key}: {message}"
    # A URL's password never reaches the message, nor a key pasted where its variable's name belongs.
    value = redact_url(error["input"]) if isinstance(error["input"], str) else error["input"]
    if error["loc"][-1] in ("api_key_env", "auth_env"):
        return f"'{key}' is invalid: {message[0].lower()}{message[1:]}"
    return f"'{key}' = {value!r} is invalid: {message[0].lower()}{message[1:]}"
