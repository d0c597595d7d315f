"""The model picker in Debian's headless Chromium: the page lists the configured models, a pick switches the open
conversation, its next answer says which model wrote it, and the pick survives a reload."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.web import WebServer, create_app
from bot.config import ModelSettings, SamplingSettings, Secrets, Settings
from bot.conversations import ConversationManager
from bot.wording import answered_by
from tests.conftest import MODEL_PATH
from tests_e2e.test_web_page import LAST_REPLY, Console, browser, console, opened, until  # noqa: F401

ANSWER = "Hello from a model."


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.engine.n_threads = 1
    settings.models = [
        ModelSettings(name="second", description="the same, loaded again", path=MODEL_PATH, n_ctx=1024, kv_pool_mb=24)
    ]
    settings.sampling = SamplingSettings(max_tokens=16, temperature=0.0, seed=1, grammar=f'root ::= "{ANSWER}"')
    return settings


@pytest.fixture
async def page_url(manager: ConversationManager, settings: Settings) -> AsyncIterator[str]:
    server = WebServer(create_app(manager, settings, Secrets()), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.url
    finally:
        await manager.shutdown()
        await server.close()


async def test_a_model_picked_on_the_page_answers_the_conversation(
    browser,
    page_url: str,  # noqa: F811
    console: Console,
) -> None:  # noqa: F811
    page = await opened(browser, page_url)
    options = await page.eval_on_selector_all("#model option", "(all) => all.map((o) => o.value)")
    assert options == [MODEL_PATH.stem, "second"]
    assert await page.input_value("#model") == MODEL_PATH.stem

    await page.select_option("#model", "second")  # before the first message: the conversation is created
    await until(page, "location.hash.length > 1")
    await page.fill("#input", "Who answers?")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    assert await page.inner_text(".message.assistant .body") == ANSWER
    assert answered_by("second") in await page.inner_text(".message.assistant .notes")

    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    assert await page.input_value("#model") == "second"
    assert console.errors == []
