"""[tools] in config.toml: the documented example loads, and each mistake is one line naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_commented_example_in_config_toml_loads(tmp_path: Path) -> None:
    text = (ROOT / "config.toml").read_text()
    start = text.index("\n[tools]")
    section = text[start : text.find("\n\n", start + 1)]  # up to the blank line that ends it
    example = re.sub(r"^# (\[\[tools\.(?:servers|allow)\]\]|(?!servers |allow )\w+ = )", r"\1", section, flags=re.M)
    (tmp_path / "config.toml").write_text(example)
    tools = load_settings(tmp_path / "config.toml").tools
    files, wiki = tools.servers
    assert (files.command, files.args[0], files.tools["write_file"].confirm) == ("npx", "-y", True)
    assert (wiki.url, wiki.auth_env, wiki.auth_scheme) == ("https://wiki.example.com/mcp", "WIKI_MCP_TOKEN", "Bearer")
    assert tools.max_rounds == 4 and tools.call_timeout == 30.0 and tools.max_result_chars == 8000
    server, members, web = tools.allow
    assert (server.places, server.users, server.roles, server.tools) == (
        ["discord/ch/123456789012345678/*"],
        [],
        [],
        ["*"],
    )
    assert (members.places, members.roles, members.users, members.tools) == (
        ["discord/ch/123456789012345678/*"],
        ["345678901234567890"],
        ["234567890123456789"],
        ["read_file", "search_*"],
    )
    assert (web.places, web.users, web.roles, web.tools) == (["web/*"], [], [], ["search_*"])


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[[tools.servers]]\nname = "a"\ncommand = "x"\nurl = "http://127.0.0.1/mcp"',
            "tools.servers[0]: tool server 'a' needs either command (a stdio server) or url (a streamable-HTTP "
            "server), not both",
        ),
        ('[[tools.servers]]\nname = "a"', "tools.servers[0]: tool server 'a' needs either command"),
        (
            '[[tools.servers]]\nname = "a b"\ncommand = "x"',
            "'tools.servers[0].name' = 'a b' is invalid: must be 1 to 64 letters, digits, _ or -",
        ),
        (
            '[[tools.servers]]\nname = "a"\nurl = "file:///etc/passwd"',
            "'tools.servers[0].url' = 'file:///etc/passwd' is invalid: must be an http:// or https:// URL",
        ),
        (
            '[[tools.servers]]\nname = "a"\ncommand = "x"\nauth_env = "TOKEN"',
            "tools.servers[0]: tool server 'a': auth_env is for a url; pass a stdio server its token through env",
        ),
        (
            '[[tools.servers]]\nname = "a"\ncommand = "x"\n[[tools.servers]]\nname = "a"\ncommand = "y"',
            "tools.servers names 'a' twice",
        ),
        (
            '[[tools.servers]]\nname = "a"\ncommand = "x"\ntools = { t = { confirm = "maybe" } }',
            "'tools.servers[0].tools.t.confirm' = 'maybe' is invalid",
        ),
        (
            '[[tools.servers]]\nname = "a"\ncommand = "x"\ntools = { t = { confrim = true } }',
            "unknown setting 'tools.servers[0].tools.t.confrim'",
        ),
        ("[tools]\ncall_timeout = 0", "'tools.call_timeout' = 0 is invalid: input should be greater than 0"),
        (
            "[tools]\nmax_result_chars = 10",
            "'tools.max_result_chars' = 10 is invalid: input should be greater than or equal to 100",
        ),
    ],
)
def test_a_bad_tools_value_is_one_line_naming_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    (tmp_path / "config.toml").write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "config.toml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'config.toml'}: {expected}"), message


def test_a_token_pasted_where_its_variable_name_belongs_is_not_echoed(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[[tools.servers]]\nname = "a"\nurl = "http://127.0.0.1/mcp"\nauth_env = "sk-live-abc123!"'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path / "config.toml")
    assert "sk-live-abc123" not in str(caught.value)
    assert "'tools.servers[0].auth_env' is invalid: must name an environment variable" in str(caught.value)
