"""The configured models: name -> backend (an embedded GGUF or an OpenAI-compatible server), with each one's own
context window, chat template and capabilities.

Memory: the default model (``[engine]``) is opened at start and stays. Every other embedded GGUF is loaded on
first use and unloaded after ``[model_pool] idle_seconds`` unused; before one is loaded, the least recently used
idle models are unloaded until weights and KV pool fit ``[model_pool] memory_mb``. A model in use is never
unloaded: one that cannot fit beside them fails with a line that names it. Server models take no memory here.
A model that fails to load fails alone; it is tried again on a later use, after ``RETRY_LOAD_SECONDS``.

Over 400 lines: the registry's loading, unloading and memory budget are one state machine over the models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.config import EngineSettings, ModelSettings, Secrets, Settings, default_model_name
from bot.engine.base import InferenceEngine, renders_template
from bot.errors import EngineError, LlamarelayError

__all__ = [
    "Capabilities",
    "Model",
    "ModelRegistry",
    "ModelUnavailable",
    "configured_models",
    "open_backend",
    "unavailable_line",
]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
RETRY_LOAD_SECONDS = 30.0  # a model that failed to load is not tried again sooner (each try costs a load)
DEFAULT_IMAGE_SIZE = 1024  # the [engine] model's longest image side, in pixels

Opener = Callable[[EngineSettings, "str | None"], Awaitable[InferenceEngine]]


class ModelUnavailable(EngineError):
    """A model cannot answer now (it failed to load, or does not fit in memory); the others are unaffected."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(unavailable_line(name, reason))
        self.model_name = name


def unavailable_line(name: str, reason: str) -> str:
    """The failure line users see: which model, why, and what they can do about it."""
    reason = reason.strip().rstrip(".")
    return f"The model {name} is unavailable: {reason[:1].lower()}{reason[1:]}. Try /model to pick another."


async def open_backend(settings: EngineSettings, api_key: str | None = None) -> InferenceEngine:
    """An engine for ``settings``: llama.cpp loaded in this process (off the event loop), or a remote server."""
    if settings.backend == "openai":
        from bot.engine.remote import RemoteEngine

        remote = RemoteEngine(settings, api_key)
        await remote.start()
        return remote
    from bot.engine.threads import configure_openmp

    configure_openmp()  # before llama.cpp loads: libgomp reads it then
    from bot.engine.embedded import Engine  # here: a remote backend never loads llama.cpp

    return await asyncio.to_thread(Engine, settings)  # loading takes a while: the loop stays free


@dataclass(frozen=True)
class Capabilities:
    vision: bool  # its user turns may carry images
    tools: bool | None  # it calls tools; None: not known (a server model not said in the config, or not loaded)


@dataclass(eq=False)
class Model:
    """One configured model: what it is, and whether (and how much) it is loaded now."""

    name: str
    settings: EngineSettings  # [engine] with this model's own keys over it
    description: str = ""
    is_default: bool = False
    image_size: int = DEFAULT_IMAGE_SIZE
    mmproj: os.PathLike[str] | None = None
    api_key_env: str | None = None
    declared_vision: bool | None = None
    declared_tools: bool | None = None
    engine: InferenceEngine | None = None
    memory_bytes: int = 0  # weights and KV pool while loaded (0 for a server model)
    users: int = 0  # replies using it now
    last_used: float = 0.0
    failed: tuple[float, str] | None = None  # (when, why) its last load failed
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def backend(self) -> Literal["embedded", "openai"]:
        return self.settings.backend

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx if self.engine is not None else self.settings.n_ctx

    @property
    def chat_template(self) -> Any:
        """The model's own template once loaded (None for a server model, which applies its own)."""
        return self.engine.chat_template if self.engine is not None and renders_template(self.engine) else None

    @property
    def capabilities(self) -> Capabilities:
        if self.backend == "openai":
            # The OpenAI API does not say what a model reads: only the config can.
            return Capabilities(vision=bool(self.declared_vision), tools=self.declared_tools)
        # An embedded model reads images through llama.cpp's mtmd when it has an mmproj; once loaded, its engine
        # says whether that projector could be used (not one whose images need M-RoPE positions).
        vision = self.mmproj is not None if self.declared_vision is None else self.declared_vision
        vision = vision and getattr(self.engine, "sees_images", True)
        tools = self.declared_tools
        if tools is None and self.chat_template is not None:
            tools = "tools" in self.chat_template.source  # templates that take tools render them by that name
        return Capabilities(vision=vision, tools=tools)

    def estimate_bytes(self) -> int:
        """Memory it will take once loaded: its files and its KV pool (exact once it is loaded)."""
        if self.backend == "openai":
            return 0
        if self.engine is not None:
            return self.memory_bytes
        files = [self.settings.model_path] + ([self.mmproj] if self.mmproj is not None else [])
        size = sum(os.stat(path).st_size for path in files if os.path.isfile(path))
        return size + self.settings.kv_pool_mb * MIB


class ModelRegistry:
    """Every configured model by name; `use` lends a model's engine for one reply, loading it first if needed.

    Call from the event loop. ``opener`` builds an engine (tests pass their own to count loads).
    """

    def __init__(
        self,
        settings: Settings,
        secrets: Secrets | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        opener: Opener = open_backend,
    ) -> None:
        self._pool = settings.model_pool
        self._secrets = secrets or Secrets()
        self._environ = os.environ if environ is None else environ
        self._opener = opener
        self._budget = asyncio.Lock()  # one load or unload decision at a time
        self._closed = False
        self._unloading: set[asyncio.Task[None]] = set()  # idle unloads under way (held: tasks are weakly kept)
        self._models: dict[str, Model] = {model.name.lower(): model for model in configured_models(settings)}
        self._adopted: InferenceEngine | None = None  # a default engine its caller opened and will close

    # -- what there is -----------------------------------------------------------------------------------

    @property
    def default(self) -> Model:
        return next(iter(self._models.values()))

    def names(self) -> list[str]:
        """Every model's name, the default first, then in config order (for /model and /v1/models)."""
        return [model.name for model in self._models.values()]

    def find(self, name: str) -> Model | None:
        """The model called ``name`` (any case), or None."""
        return self._models.get(name.strip().lower())

    def get(self, name: str) -> Model:
        """The model called ``name`` (any case); `ModelUnavailable` naming the choices when there is none."""
        model = self._models.get(name.strip().lower())
        if model is None:
            raise ModelUnavailable(name, f"there is no such model (these are: {', '.join(self.names())})")
        return model

    def loaded(self) -> list[Model]:
        return [model for model in self._models.values() if model.engine is not None]

    @property
    def resident_bytes(self) -> int:
        """Memory the loaded embedded models hold now."""
        return sum(model.memory_bytes for model in self.loaded())

    # -- lending -----------------------------------------------------------------------------------------

    async def start(self, default_engine: InferenceEngine | None = None) -> None:
        """Open the default model now (a bad [engine] fails at start, as it always has), or adopt ``default_engine``."""
        default = self.default
        if default_engine is not None:
            default.engine, default.memory_bytes = default_engine, _measure(default_engine)
        else:
            async with default.lock:
                await self._load(default)

    def adopt(self, engine: InferenceEngine) -> None:
        """Make ``engine`` the default model's, opened (and closed) by whoever passes it: `aclose` leaves it."""
        default = self.default
        default.engine, default.memory_bytes, self._adopted = engine, _measure(engine), engine

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[InferenceEngine]:
        """Lend model ``name``'s engine while the context lasts; loads it first when it is not loaded.

        Raises `ModelUnavailable` (naming the model) when it cannot be loaded or does not fit; other models are
        unaffected. While lent, a model is never unloaded.
        """
        model = self.get(name)
        async with model.lock:  # one load of a model at a time; later users find it loaded
            if self._closed:
                raise ModelUnavailable(model.name, "the bot is shutting down")
            if model.engine is None:
                await self._load(model)
            engine = model.engine
            assert engine is not None
            model.users += 1  # before any await: a concurrent unload sees it in use
        if model.idle_timer is not None:
            model.idle_timer.cancel()
            model.idle_timer = None
        try:
            yield engine
        finally:
            model.users -= 1
            model.last_used = time.monotonic()
            if (
                model.users == 0
                and not model.is_default
                and model.backend == "embedded"
                and self._pool.idle_seconds > 0
                and not self._closed
            ):
                model.idle_timer = asyncio.get_running_loop().call_later(
                    self._pool.idle_seconds, self._start_idle_unload, model
                )

    def failure_line(self, name: str, error: BaseException) -> str:
        """The line a reply of model ``name`` ends with when its engine failed (a server that is down): the
        engine's reason, naming the model and pointing at /model."""
        return unavailable_line(self.get(name).name, str(error))

    def api_keys(self) -> list[str]:
        """The keys the server models' ``api_key_env`` variables hold now, for redaction from logs."""
        return [
            key
            for model in self._models.values()
            if model.api_key_env and (key := self._environ.get(model.api_key_env))
        ]

    async def aclose(self) -> None:
        """Close every loaded engine (at shutdown, once replies have ended)."""
        self._closed = True
        for model in self._models.values():
            if model.idle_timer is not None:
                model.idle_timer.cancel()
        await asyncio.gather(*self._unloading, return_exceptions=True)
        for model in self._models.values():
            if model.engine is not None and model.engine is self._adopted:
                continue  # its caller closes it
            await self._unload(model)

    # -- loading and unloading ---------------------------------------------------------------------------

    async def _load(self, model: Model) -> None:
        if model.failed is not None and time.monotonic() - model.failed[0] < RETRY_LOAD_SECONDS:
            raise ModelUnavailable(model.name, model.failed[1])
        api_key = self._api_key(model)
        async with self._budget:
            await self._make_room(model, model.estimate_bytes())
            try:
                engine = await self._opener(model.settings, api_key)
            except LlamarelayError as exc:
                why = str(exc)
            except Exception as exc:  # a failure inside llama.cpp's loader: this model fails, not the bot
                log.exception("loading the model %s failed", model.name)
                why = f"it could not be loaded ({type(exc).__name__}: {exc})"
            else:
                model.engine, model.memory_bytes, model.failed = engine, _measure(engine), None
                model.last_used = time.monotonic()
                log.info(
                    "model %s loaded (%.0f MB; %.0f MB of models in memory)",
                    model.name,
                    model.memory_bytes / MIB,
                    self.resident_bytes / MIB,
                )
                return
        model.failed = (time.monotonic(), why)
        log.warning("model %s is unavailable: %s", model.name, why)
        raise ModelUnavailable(model.name, why)

    async def _make_room(self, model: Model, needed: int) -> None:
        """Unload idle models, least recently used first, until ``needed`` bytes fit the budget beside the rest."""
        budget = self._pool.memory_mb * MIB
        if not needed or not budget:
            return
        if needed > budget:
            raise ModelUnavailable(
                model.name,
                f"it needs about {needed // MIB:,} MB, more than [model_pool] memory_mb ({self._pool.memory_mb:,})",
            )
        while self.resident_bytes + needed > budget:
            idle = [m for m in self.loaded() if m.users == 0 and not m.is_default and m.memory_bytes]
            if not idle:
                raise ModelUnavailable(
                    model.name,
                    f"it needs about {needed // MIB:,} MB and the "
                    f"{self.resident_bytes // MIB:,} MB of models in memory are in use; try "
                    "again when their replies are done",
                )
            oldest = min(idle, key=lambda m: m.last_used)
            log.info("unloading model %s to make room for %s", oldest.name, model.name)
            await self._unload(oldest)

    def _start_idle_unload(self, model: Model) -> None:
        task = asyncio.get_running_loop().create_task(self._unload_if_idle(model), name=f"unload-{model.name}")
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    async def _unload_if_idle(self, model: Model) -> None:
        model.idle_timer = None
        async with self._budget:
            if (
                model.users == 0
                and model.engine is not None
                and time.monotonic() - model.last_used >= self._pool.idle_seconds * 0.99
            ):
                log.info("unloading model %s: unused for %.0f s", model.name, self._pool.idle_seconds)
                await self._unload(model)

    @staticmethod
    async def _unload(model: Model) -> None:
        engine, model.engine, model.memory_bytes = model.engine, None, 0  # first: no new user gets it
        if engine is not None:
            await engine.aclose()

    def _api_key(self, model: Model) -> str | None:
        if model.is_default:
            return self._secrets.engine_api_key
        if model.api_key_env is None:
            return None
        key = self._environ.get(model.api_key_env)
        if not key:
            raise ModelUnavailable(model.name, f"its API key variable {model.api_key_env} is not set")
        return key


def configured_models(settings: Settings) -> list[Model]:
    """Every configured model, none loaded: the default (``[engine]``) first, then ``[[models]]`` in order."""
    default = Model(
        default_model_name(settings.engine),
        settings.engine,
        is_default=True,
        mmproj=settings.engine.mmproj,
        declared_vision=settings.engine.vision or None,
    )
    return [default, *(_configured(entry, settings.engine) for entry in settings.models)]


def _configured(entry: ModelSettings, engine: EngineSettings) -> Model:
    """A ``[[models]]`` entry as a `Model`: ``[engine]`` with the entry's own keys over it."""
    update: dict[str, Any] = {
        "name": entry.name,
        "backend": entry.backend,
        "n_ctx": entry.n_ctx or engine.n_ctx,
        "vision": False,
    }  # [engine]'s own: this model's is the entry's
    if entry.path is not None:
        # A projector said not to be used (vision = false) is not loaded.
        update.update(
            model_path=entry.path, mmproj=entry.mmproj if entry.vision is not False else None, base_url=None, model=None
        )
        if entry.n_gpu_layers is not None:
            update["n_gpu_layers"] = entry.n_gpu_layers
        if entry.kv_pool_mb is not None:
            update["kv_pool_mb"] = entry.kv_pool_mb
        if engine.state_dir is not None:  # KV states are one model's: never read by another
            update["state_dir"] = engine.state_dir / "models" / entry.name
    else:
        update.update(base_url=entry.url, model=entry.model, mmproj=None)
    return Model(
        entry.name,
        engine.model_copy(update=update),
        description=entry.description,
        image_size=entry.image_size,
        mmproj=entry.mmproj,
        api_key_env=entry.api_key_env,
        declared_vision=entry.vision,
        declared_tools=entry.tools,
    )


def _measure(engine: InferenceEngine) -> int:
    """An embedded engine's weights (its image projector's too) and KV pool; 0 for a server."""
    return (
        int(getattr(engine, "model_size", 0))
        + int(getattr(engine, "projector_size", 0))
        + int(getattr(engine, "kv_cache_bytes", 0))
    )
