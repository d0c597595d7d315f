"""config.toml loading: defaults, one clear line per mistake, secrets from the environment only."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import RedactingFormatter
from bot.config import ModelSettings, Secrets, Settings, load_settings
from bot.errors import ConfigError
from bot.ratelimit import RateLimiter
from tests.conftest import MODEL_PATH

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_lists_every_setting_with_its_default() -> None:
    shipped = load_settings(ROOT / "config.toml")
    defaults = Settings()
    assert shipped.engine.model_path == ROOT / defaults.engine.model_path
    assert shipped.store.path == ROOT / defaults.store.path
    assert shipped.engine.state_dir == ROOT / "data" / "kv" and defaults.engine.state_dir is None
    assert shipped.models == defaults.models == []  # [[models]]: an example, commented out
    for section in Settings.model_fields.keys() - {"models"}:
        ours, theirs = getattr(shipped, section).model_dump(), getattr(defaults, section).model_dump()
        ours.pop("model_path", None), theirs.pop("model_path", None)
        ours.pop("path", None), theirs.pop("path", None)
        ours.pop("state_dir", None), theirs.pop("state_dir", None)
        assert ours == theirs, section
    # Every key appears in the file, set or commented out ("# grammar = ''"), under its own section.
    text = (ROOT / "config.toml").read_text()
    sections = {name: body for name, body in re.findall(r"^\[(\w+)\][^\n]*\n(.*?)(?=^\[|\Z)", text, re.M | re.S)}
    sections["models"] = text.split("# [[models]]", 1)[1]
    for section, model in Settings.model_fields.items():
        fields = ModelSettings.model_fields if section == "models" else model.annotation.model_fields  # type: ignore[union-attr]
        for key in fields:
            assert re.search(rf"^#? ?{key} =", sections[section], re.M), f"[{section}] {key} is not in config.toml"


def test_reply_length_must_leave_room_for_the_prompt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sampling.max_tokens \(4096\) must be below engine.n_ctx \(4096\)"):
        load_settings(write(tmp_path, "[engine]\nn_ctx = 4096\n[sampling]\nmax_tokens = 4096\n"))


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        # llama.cpp aborts the process (GGML_ASSERT, exit 134) when more sequences run than a batch holds.
        ("[engine]\nparallel = 32\nn_batch = 16\n", r"engine.parallel \(32\) must not exceed engine.n_batch \(16\)"),
        # A penalty of 0 divides logits by zero: the model then writes garbage.
        ("[sampling]\nrepeat_penalty = 0\n", r"'sampling.repeat_penalty' = 0 is invalid: .*greater than 0"),
        # llama.cpp's seed is 32 bits, and 0xFFFFFFFF means "random".
        ("[sampling]\nseed = 4294967295\n", r"'sampling.seed' = 4294967295 is invalid: .*less than or equal"),
        (
            "[engine]\nn_gpu_layers = -2\n",
            r"'engine.n_gpu_layers' = -2 is invalid: must be -1 \(every layer on the "
            r"GPU\), 0 \(CPU only\) or a number of layers",
        ),
        ("[engine]\nmain_gpu = -1\n", r"'engine.main_gpu' = -1 is invalid: .*greater than or equal to 0"),
    ],
)
def test_values_llama_cpp_cannot_take_are_one_line_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        load_settings(write(tmp_path, toml))
    assert "\n" not in str(error.value)


# Run in a subprocess: if llama.cpp aborts, only that process dies (exit 134), and the test says which setting.
ENGINE_RUN = """
import asyncio, sys
from bot.config import load_settings
from bot.engine import Engine

async def main() -> None:
    settings = load_settings(sys.argv[1])
    engine = Engine(settings.engine)
    try:
        # Several slots at once with a prompt as long as its context allows: the biggest batches there are.
        prompt = (engine.tokenize("word " * engine.n_ctx) * 2)[:engine.n_ctx - 2]
        requests = [engine.submit(prompt, settings.sampling) for _ in range(min(settings.engine.parallel, 4))]
        for request in requests:
            async for _ in request:
                pass
            assert request.finish_reason.value in ("stop", "length"), request.finish_reason
    finally:
        engine.close()

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "engine",
    [
        "n_ctx = 300\nparallel = 1",  # llama.cpp rounds a context up to 512 but caps its batch at 300
        "n_ctx = 300\nparallel = 3\nn_batch = 8192",
        "n_ctx = 256\nparallel = 16\nn_batch = 16\nprefill_chunk = 8192",
        "n_ctx = 256\nparallel = 64\nn_batch = 64",
        "n_ctx = 256\nparallel = 1\nn_batch = 8192\nn_threads = 32",  # many more threads than cores
    ],
)
def test_accepted_extremes_never_abort_the_engine(tmp_path: Path, engine: str) -> None:
    threads = "" if "n_threads" in engine else "n_threads = 1\n"  # spinning threads crawl on a busy machine
    config = write(
        tmp_path,
        f'[engine]\nmodel_path = "{MODEL_PATH}"\n{engine}\n{threads}[sampling]\nmax_tokens = 2\ntemperature = 0.0\n',
    )
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_RUN, str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_bad_value_names_key_value_and_expectation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, "[engine]\nn_ctx = 'lots'\n"))
    message = str(error.value)
    assert "engine.n_ctx" in message and "'lots'" in message and "integer" in message
    assert "\n" not in message


def test_gpu_settings_default_to_every_layer_on_the_gpus_llama_cpp_finds(tmp_path: Path) -> None:
    assert (Settings().engine.n_gpu_layers, Settings().engine.main_gpu) == (-1, None)
    engine = load_settings(write(tmp_path, "[engine]\nn_gpu_layers = 0\nmain_gpu = 1\n")).engine
    assert (engine.n_gpu_layers, engine.main_gpu) == (0, 1)


def test_out_of_range_value_says_the_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sampling.temperature.*-1.*greater than or equal to 0"):
        load_settings(write(tmp_path, "[sampling]\ntemperature = -1\n"))


def test_unknown_key_is_an_error_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'engine.n_ctxx'"):
        load_settings(write(tmp_path, "[engine]\nn_ctxx = 100\n"))


def test_malformed_toml_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML.*line 2") as error:
        load_settings(write(tmp_path, "[engine]\nn_ctx = = 3\n"))
    assert "\n" not in str(error.value)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[engine]\nmodel_path = "m/x.gguf"\n'))
    assert settings.engine.model_path == tmp_path / "m" / "x.gguf"


# -- environment overrides (LLAMARELAY_<SECTION>__<KEY>) ------------------------------------------------


def test_environment_overrides_a_nested_key_and_keeps_the_rest_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMARELAY_WEB__HOST", "0.0.0.0")
    monkeypatch.setenv("LLAMARELAY_SAMPLING__TEMPERATURE", "0.2")
    monkeypatch.setenv("LLAMARELAY_DISCORD__GUILD_IDS", "[11, 22]")
    settings = load_settings(write(tmp_path, "[web]\nport = 9000\nhost = '127.0.0.1'\n[sampling]\ntop_k = 7\n"))
    assert (settings.web.host, settings.web.port) == ("0.0.0.0", 9000)
    assert (settings.sampling.temperature, settings.sampling.top_k) == (0.2, 7)
    assert settings.discord.guild_ids == [11, 22]
    assert Settings().web.host == "0.0.0.0" and load_settings(None).ops.port == Settings().ops.port


def test_the_deprecated_streaming_edit_interval_still_paces_the_web_page_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.config"):
        assert load_settings(write(tmp_path, "[streaming]\nedit_interval = 0.5\n")).web.edit_interval == 0.5
    assert "[streaming] edit_interval is deprecated" in caplog.text and "[web] edit_interval" in caplog.text
    both = "[streaming]\nedit_interval = 0.5\n[web]\nedit_interval = 2.0\n"
    assert load_settings(write(tmp_path, both)).web.edit_interval == 2.0  # the new key wins
    caplog.clear()
    assert load_settings(write(tmp_path, "")).web.edit_interval == 1.0 and not caplog.text
    monkeypatch.setenv("LLAMARELAY_STREAMING__EDIT_INTERVAL", "0.3")
    assert load_settings(write(tmp_path, "")).web.edit_interval == 0.3


def test_bad_environment_value_is_one_line_naming_the_variable_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAMARELAY_WEB__PORT", "eighty")
    for source in (write(tmp_path, "[web]\nport = 9000\n"), None):
        with pytest.raises(ConfigError) as error:
            load_settings(source)
        message = str(error.value)
        assert message.startswith("environment variable LLAMARELAY_WEB__PORT: 'web.port' = 'eighty' is invalid")
        assert "integer" in message and "\n" not in message


def test_misspelt_environment_key_is_an_error_and_secrets_are_not_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMARELAY_OPS__PROT", "1")
    with pytest.raises(ConfigError, match="unknown setting 'ops.prot'"):
        load_settings(None)
    monkeypatch.delenv("LLAMARELAY_OPS__PROT")
    # The web token has its own variable; it is a secret, never a setting (nor readable as one).
    monkeypatch.setenv("LLAMARELAY_WEB_TOKEN", "token-secret")
    assert "token-secret" not in Settings().model_dump_json()
    monkeypatch.setenv("LLAMARELAY_WEB__TOKEN", "token-secret")
    with pytest.raises(ConfigError, match="unknown setting 'web.token'"):
        load_settings(None)


def test_secrets_come_from_the_environment_and_never_print() -> None:
    secrets = Secrets.from_env({"DISCORD_TOKEN": "discord-secret", "SLACK_BOT_TOKEN": "xoxb-secret"})
    assert secrets.discord_token == "discord-secret" and secrets.slack_app_token is None
    assert "secret" not in repr(secrets) and "secret" not in str(secrets)


def test_log_lines_never_contain_a_token() -> None:
    formatter = RedactingFormatter("%(message)s", ["xoxb-123-secret"])
    try:
        raise RuntimeError("auth failed for xoxb-123-secret")
    except RuntimeError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "token %s rejected", ("xoxb-123-secret",), exc_info=sys.exc_info()
        )
    text = formatter.format(record)
    assert "xoxb-123-secret" not in text
    assert text.startswith("token [redacted] rejected") and "auth failed for [redacted]" in text


def test_rate_limiter_allows_n_per_minute_per_user() -> None:
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.allow("a") and limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b")
    assert limiter.retry_after("a") == pytest.approx(60.0)
    now[0] = 60.0
    assert limiter.allow("a")
    assert RateLimiter(0).allow("anyone")
