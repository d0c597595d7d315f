"""The web page's model picker, through its JSON API over real HTTP: /api/info lists the configured models, a
conversation says its model, PUT …/model switches it (400 naming an unknown one), and its next answer comes from
that model (the small model loaded again under a second name), recorded with the answer."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bot.config import ModelSettings, Settings
from bot.wording import answered_by, unknown_model
from tests.conftest import MODEL_PATH
from tests.test_web import Browser, browsers, server  # noqa: F401

DEFAULT = MODEL_PATH.stem


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.engine.n_threads = 1
    settings.models = [
        ModelSettings(name="second", description="the same, loaded again", path=MODEL_PATH, n_ctx=1024, kv_pool_mb=24)
    ]
    return settings


async def test_a_conversation_picks_its_model_and_its_next_answer_comes_from_it(
    browsers: Callable[[], Browser],
) -> None:  # noqa: F811
    browser = browsers()
    status, info = await browser.call("GET", "/api/info")
    assert status == 200
    assert info["models"] == [
        {"name": DEFAULT, "description": "", "default": True, "vision": False},
        {"name": "second", "description": "the same, loaded again", "default": False, "vision": False},
    ]
    switched, kept = await browser.new('root ::= "Second."', 8), await browser.new('root ::= "First."', 8)
    assert (await browser.conversation(switched))["model"] == DEFAULT

    path = f"/api/conversations/{switched}/model"
    assert await browser.call("PUT", path, json={"model": "gpt-9"}) == (
        400,
        {"error": "unknown_model", "message": unknown_model("gpt-9", [DEFAULT, "second"])},
    )
    assert (await browser.call("PUT", path, json={"model": 7}))[0] == 400
    assert await browser.call("PUT", path, json={"model": "Second"}) == (200, {"model": "second"})
    assert (await browser.conversation(switched))["model"] == "second"

    await (await browser.send(switched, "who are you?")).done()
    await (await browser.send(kept, "and you?")).done()
    answer = (await browser.conversation(switched))["messages"][-1]
    assert (answer["content"], answer["model"], answer["notes"]) == ("Second.", "second", [answered_by("second")])
    other = (await browser.conversation(kept))["messages"][-1]
    assert (other["content"], other["model"], other["notes"]) == ("First.", DEFAULT, [])
