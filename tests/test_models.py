"""The model registry with real llama.cpp engines (the small model, loaded under several names): [[models]] in
the config, loading on first use, each model's own window, unloading after idle and to fit the memory budget,
never while in use, and a model that fails to load failing alone with a line that names it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import EngineSettings, ModelSettings, SamplingSettings, Secrets, Settings, load_settings
from bot.engine.base import InferenceEngine
from bot.errors import ConfigError, EngineError
from bot.models import ModelRegistry, ModelUnavailable, open_backend
from bot.prompt import Prompt
from tests.conftest import MODEL_PATH
from tests.inference_server import free_port

GREEDY = SamplingSettings(max_tokens=4, temperature=0.0, seed=1, grammar='root ::= "Yes."')
DEFAULT = "SmolLM2-135M-Instruct.Q4_1"


def small(n_ctx: int = 1024) -> EngineSettings:
    """The engine settings of a quick, small load: one thread, one sequence, a small KV pool."""
    return EngineSettings(
        model_path=MODEL_PATH, n_ctx=n_ctx, n_threads=1, parallel=1, kv_pool_mb=24, state_dir=None, n_gpu_layers=0
    )


def registry_settings(*models: ModelSettings, memory_mb: int = 0, idle_seconds: float = 0) -> Settings:
    settings = Settings(engine=small(), models=list(models))
    settings.sampling = GREEDY
    settings.model_pool.memory_mb = memory_mb
    settings.model_pool.idle_seconds = idle_seconds
    return settings


def embedded(name: str, *, n_ctx: int = 1024, path: Path = MODEL_PATH) -> ModelSettings:
    return ModelSettings(name=name, path=path, n_ctx=n_ctx, kv_pool_mb=24)


class Counting:
    """`open_backend`, counting the loads of each model file."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    async def __call__(self, settings: EngineSettings, api_key: str | None) -> InferenceEngine:
        self.loads.append(settings.name or "default")
        return await open_backend(settings, api_key)


@pytest.fixture
async def opener() -> Counting:
    return Counting()


@pytest.fixture
async def registry(request: pytest.FixtureRequest, opener: Counting) -> AsyncIterator[ModelRegistry]:
    registry = ModelRegistry(request.param, opener=opener)
    await registry.start()
    yield registry
    await registry.aclose()


async def reply(engine: InferenceEngine) -> str:
    messages = [{"role": "user", "content": "Ready?"}]
    generation = engine.submit(Prompt(messages, engine.chat_tokens(messages)), GREEDY)
    return "".join([event async for event in generation if isinstance(event, str)])


# -- config -------------------------------------------------------------------------------------------


def test_the_engine_section_alone_is_the_one_default_model(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel_path = "{MODEL_PATH}"\nn_ctx = 2048\n')
    registry = ModelRegistry(load_settings(config))
    assert registry.names() == [DEFAULT]
    assert registry.default.is_default and registry.default.n_ctx == 2048 and registry.default.engine is None
    config.write_text('[engine]\nname = "local"\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n')
    assert ModelRegistry(load_settings(config)).names() == ["local"]


def test_models_in_the_config_inherit_the_engine_section_and_resolve_paths_beside_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'''[engine]
model_path = "{MODEL_PATH}"
n_threads = 3
state_dir = "kv"

[[models]]
name = "qwen-vl"
path = "models/qwen.gguf"
mmproj = "models/mmproj.gguf"
n_ctx = 8192

[[models]]
name = "gpt"
url = "https://api.example.com/v1"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
vision = true
''')
    settings = load_settings(config)
    registry = ModelRegistry(settings)
    assert registry.names() == [DEFAULT, "qwen-vl", "gpt"]
    local, remote = registry.get("QWEN-VL"), registry.get("gpt")
    assert local.settings.model_path == tmp_path / "models/qwen.gguf"
    assert local.mmproj == tmp_path / "models/mmproj.gguf"
    assert (local.n_ctx, local.settings.n_threads, local.backend) == (8192, 3, "embedded")
    assert local.settings.state_dir == tmp_path / "kv" / "models" / "qwen-vl"  # never another model's KV states
    assert (remote.backend, remote.settings.base_url, remote.settings.model) == (
        "openai",
        "https://api.example.com/v1",
        "gpt-4o-mini",
    )
    assert remote.settings.n_ctx == settings.engine.n_ctx
    assert remote.capabilities.vision and not registry.default.capabilities.vision
    assert local.capabilities.vision  # an embedded model with an mmproj reads images (llama.cpp's mtmd)


@pytest.mark.parametrize(
    ("entry", "line"),
    [
        ('name = "two words"\npath = "a.gguf"', "'models[0].name' = 'two words' is invalid: must be 1-64 letters"),
        ('name = "x"', "models[0]: model 'x' needs either path (a GGUF file) or url (a server), not neither"),
        ('name = "x"\npath = "a.gguf"\nurl = "http://h/v1"', "not both"),
        (
            'name = "x"\nurl = "http://h/v1"\napi_key_env = "sk-live-123"',
            "'models[0].api_key_env' is invalid: must name an environment variable",
        ),
        ('name = "x"\npath = "a.gguf"\nvision = true', "models[0]: model 'x': vision = true needs mmproj"),
        (
            'name = "x"\nurl = "http://h/v1"\nmmproj = "p.gguf"',
            "mmproj, n_gpu_layers and kv_pool_mb belong to an embedded model",
        ),
        (
            f'name = "{DEFAULT.lower()}"\npath = "a.gguf"',
            f"models[0]: the name '{DEFAULT.lower()}' is taken by [engine]",
        ),
        (
            'name = "x"\npath = "a.gguf"\nn_ctx = 512',
            "models[0] ('x'): sampling.max_tokens (512) must be below its n_ctx (512)",
        ),
        ('name = "x"\npath = "a.gguf"\ncolour = "red"', "unknown setting 'models[0].colour'"),
    ],
)
def test_a_bad_model_entry_is_one_line_naming_it(tmp_path: Path, entry: str, line: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"[[models]]\n{entry}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert line in str(raised.value) and "\n" not in str(raised.value)
    assert "sk-live" not in str(raised.value)  # a key pasted in the wrong place is never repeated


# -- loading, each its own ----------------------------------------------------------------------------


@pytest.mark.parametrize("registry", [registry_settings(embedded("second", n_ctx=2048))], indirect=True)
async def test_a_model_loads_on_first_use_with_its_own_window_and_template(
    registry: ModelRegistry, opener: Counting
) -> None:
    assert opener.loads == ["default"] and [m.name for m in registry.loaded()] == [DEFAULT]
    second = registry.get("Second")
    assert second.engine is None and second.n_ctx == 2048
    async with registry.use("second") as engine, registry.use(DEFAULT) as default:
        assert engine is not default and (engine.n_ctx, default.n_ctx) == (2048, 1024)
        assert second.chat_template is not None and second.chat_template.source
        assert await reply(engine) == "Yes." and await reply(default) == "Yes."
    async with registry.use("second") as again:
        assert again is engine  # loaded once, lent again
    assert opener.loads == ["default", "second"]
    assert registry.resident_bytes == sum(m.memory_bytes for m in registry.loaded()) > 2 * MODEL_PATH.stat().st_size
    assert second.capabilities.tools is False  # SmolLM2's template takes no tools


@pytest.mark.parametrize("registry", [registry_settings(embedded("second"), idle_seconds=0.3)], indirect=True)
async def test_an_idle_model_is_unloaded_and_loaded_again_when_asked_for(
    registry: ModelRegistry, opener: Counting
) -> None:
    async with registry.use("second"):
        await asyncio.sleep(0.6)  # in use: never unloaded however long
        assert registry.get("second").engine is not None
    await asyncio.sleep(0.8)
    assert [m.name for m in registry.loaded()] == [DEFAULT]  # the default stays
    async with registry.use("second") as engine:
        assert await reply(engine) == "Yes."
    assert opener.loads == ["default", "second", "second"]


@pytest.mark.parametrize("registry", [registry_settings(embedded("a"), embedded("b"))], indirect=True)
async def test_the_budget_unloads_the_least_recently_used_idle_model_but_never_one_in_use(
    registry: ModelRegistry, opener: Counting
) -> None:
    one = registry.resident_bytes
    registry._pool.memory_mb = (2 * one + one // 2) // 2**20  # room for the default and one more
    async with registry.use("a"):
        pass
    async with registry.use("b") as b:
        assert [m.name for m in registry.loaded()] == [DEFAULT, "b"]  # a made room
        with pytest.raises(ModelUnavailable) as raised:
            async with registry.use("a"):
                pass
        assert str(raised.value).startswith("The model a is unavailable: it needs about ")
        assert "in use" in str(raised.value) and str(raised.value).endswith("Try /model to pick another.")
        assert await reply(b) == "Yes."  # the model in use was left alone
    async with registry.use("a") as a:  # b is idle now: it goes
        assert await reply(a) == "Yes." and [m.name for m in registry.loaded()] == [DEFAULT, "a"]
    registry._pool.memory_mb = one // 2**20 // 2
    with pytest.raises(
        ModelUnavailable,
        match=r"The model b is unavailable: it needs about .* more than "
        r"\[model_pool\] memory_mb",
    ):
        async with registry.use("b"):
            pass
    assert opener.loads == ["default", "a", "b", "a"]


@pytest.fixture
def junk(tmp_path: Path) -> Path:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    return path


async def test_a_model_that_fails_to_load_fails_alone_with_a_line_that_names_it(junk: Path, opener: Counting) -> None:
    registry = ModelRegistry(registry_settings(embedded("broken", path=junk)), opener=opener)
    await registry.start()
    try:
        for _ in range(2):  # the second use is refused without loading again
            with pytest.raises(ModelUnavailable) as raised:
                async with registry.use("broken"):
                    pass
            line = str(raised.value)
            assert line.startswith("The model broken is unavailable: ") and line.endswith("Try /model to pick another.")
            assert "\n" not in line
        assert opener.loads == ["default", "broken"]
        async with registry.use(DEFAULT) as engine:
            assert await reply(engine) == "Yes."
        with pytest.raises(ModelUnavailable, match=rf"no such model \(these are: {DEFAULT}, broken\)"):
            async with registry.use("gpt-5"):
                pass
    finally:
        await registry.aclose()
    assert registry.loaded() == []


async def test_a_server_model_without_its_api_key_variable_says_which_to_set() -> None:
    settings = registry_settings(ModelSettings(name="hosted", url="http://127.0.0.1:9/v1", api_key_env="HOSTED_KEY"))
    registry = ModelRegistry(settings, Secrets(), environ={})
    with pytest.raises(
        ModelUnavailable,
        match="The model hosted is unavailable: its API key variable HOSTED_KEY is not set. Try /model",
    ):
        async with registry.use("hosted"):
            pass
    await registry.aclose()


def test_the_commented_models_example_in_config_toml_loads_once_uncommented(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    head, example = text.split("# [[models]]", 1)
    lines = ["[[models]]"] + [line[2:] if line.startswith("# ") else line.lstrip("#") for line in example.splitlines()]
    config = tmp_path / "config.toml"
    config.write_text(head + "\n".join(lines) + "\n")
    registry = ModelRegistry(load_settings(config))
    assert registry.names() == [DEFAULT, "gemma3", "gpt-4o-mini"]
    assert registry.get("gpt-4o-mini").api_key_env == "OPENAI_API_KEY"
    assert registry.get("gemma3").mmproj == tmp_path / "models/mmproj-gemma-3-4b-it-f16.gguf"


async def test_a_server_model_that_is_down_fails_alone_naming_itself() -> None:
    settings = registry_settings(ModelSettings(name="hosted", url=f"http://127.0.0.1:{free_port()}/v1"))
    settings.engine.retry_seconds = 0.5
    registry = ModelRegistry(settings)
    await registry.start()
    try:
        async with registry.use("hosted") as remote:
            with pytest.raises(EngineError) as raised:
                await reply(remote)
        line = registry.failure_line("HOSTED", raised.value)
        assert line.startswith("The model hosted is unavailable: the model server is unreachable (cannot connect)")
        assert line.endswith("Try /model to pick another.") and "\n" not in line
        async with registry.use(DEFAULT) as engine:
            assert await reply(engine) == "Yes."
    finally:
        await registry.aclose()
