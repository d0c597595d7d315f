"""The web page's tool UI in Debian's headless Chromium: the real page and web adapter, the real engine with the
small model made to call a ``confirm = true`` tool by a GBNF grammar, and the real MCP server process
(tests/tools/mcp_server.py). Run / Deny are pressed in the page; the "🔧 Tool details" disclosure is opened, and a
call whose arguments and result look like markup must stay text. The fixtures (page, browser, console) are
`test_web_page`'s."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, expect

from bot.access import AccessPolicy
from bot.config import SamplingSettings, Settings, ToolGrant, ToolOptions, ToolServerSettings, ToolsSettings
from bot.conversations import ConversationManager
from bot.conversations.tools import Toolbox
from bot.tools import ToolSupervisor
from bot.wording import TOOL_DENIED_RESULT, tool_asking, tool_denied, tools_used
from tests.conversations.test_tools import call_or
from tests_e2e.test_web_page import LAST_REPLY, Console, browser, console, opened, page_url, until  # noqa: F401

SERVER = Path(__file__).resolve().parent.parent / "tests" / "tools" / "mcp_server.py"
# A file name that is markup: the call's arguments and the tool's result ("deleted <path>") both carry it.
MARKUP = "<img src=x onerror=alert(1)>"
MARKUP_CALL = f'<tool_call>\n{{"name": "delete_file", "arguments": {json.dumps({"path": MARKUP})}}}\n</tool_call>'


@pytest.fixture
async def tools(manager: ConversationManager) -> AsyncIterator[ConversationManager]:
    """The test MCP server, ``add`` and ``delete_file`` marked ``confirm = true``, granted to every web
    conversation (``web/*``: the page's conversations are ``web/ch/<browser>/<conversation>``)."""
    confirm = {"add": ToolOptions(confirm=True), "delete_file": ToolOptions(confirm=True)}
    settings = ToolsSettings(
        servers=[ToolServerSettings(name="test", command=sys.executable, args=[str(SERVER)], tools=confirm)],
        allow=[ToolGrant(places=["web/*"])],
        max_rounds=1,
    )
    async with ToolSupervisor(settings) as supervisor:
        manager.use_tools(Toolbox(supervisor, AccessPolicy(tool_grants=settings.allow), settings))
        yield manager


async def ask_for_a_tool(page: Page, settings: Settings, question: str, grammar: str, title: str) -> None:
    """Send ``question``, its reply held by ``grammar`` to a tool call or an answer, and wait for Run / Deny."""
    settings.sampling = SamplingSettings(max_tokens=60, temperature=0.0, seed=1, grammar=grammar)
    await page.fill("#input", question)
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.querySelector('.approval') || {LAST_REPLY}?.dataset.status === 'complete'")
    await expect(page.locator(".message.assistant .approval button")).to_have_text(["▶️ Run", "🚫 Deny"])
    assert await page.inner_text(".message.assistant .status") == tool_asking(title)
    assert await page.evaluate(f"{LAST_REPLY}.dataset.status") == "generating"


async def press(page: Page, label: str) -> None:
    """Press Run or Deny, and wait for the reply to finish."""
    await page.click(f".message.assistant .approval button:has-text('{label}')")
    await until(page, f"{LAST_REPLY}.dataset.status !== 'generating'")
    assert await page.locator(".message.assistant .approval").count() == 0  # the buttons are gone


async def notes(page: Page) -> list[str]:
    return await page.locator(".message.assistant .notes p").all_inner_texts()


async def reply_id(page: Page) -> int:
    """The stored id of the page's last reply (set on its node once the reply is done)."""
    return int(await page.evaluate(f"{LAST_REPLY}.dataset.id"))


async def opened_details(page: Page) -> str:
    """Open the last reply's "🔧 Tool details" disclosure (closed until then); the text it shows."""
    details = page.locator(".message.assistant details.tools").last
    await expect(details.locator("summary")).to_have_text("🔧 Tool details")
    assert await details.evaluate("(node) => node.open") is False
    await details.locator("summary").click()
    await expect(details.locator("pre")).to_have_count(1)
    return await details.locator("pre").inner_text()


async def test_run_in_the_page_runs_the_tool_and_the_answer_streams(
    browser: BrowserContext, page_url: str, settings: Settings, tools: ConversationManager, console: Console
) -> None:
    page = await opened(browser, page_url)
    await ask_for_a_tool(page, settings, "What is 2 plus 3?", call_or("5"), "Adding numbers")
    assert await page.locator(".message.assistant details.tools").count() == 0  # nothing ran yet
    await press(page, "Run")
    assert await page.evaluate(f"[{LAST_REPLY}.dataset.status, {LAST_REPLY}.dataset.text]") == ["complete", "5"]
    assert await notes(page) == [tools_used(["Adding numbers"])]
    [call] = await tools.store.tool_calls(await reply_id(page))
    assert (call.tool, call.arguments, call.result, call.is_error) == ("add", '{"a": 2, "b": 3}', "5", False)
    assert await opened_details(page) == 'add (round 1)\narguments: {"a": 2, "b": 3}\nresult: 5'
    assert console.errors == []


async def test_deny_in_the_page_leaves_a_line_and_the_tool_unrun(
    browser: BrowserContext, page_url: str, settings: Settings, tools: ConversationManager, console: Console
) -> None:
    page = await opened(browser, page_url)
    await ask_for_a_tool(page, settings, "What is 2 plus 3?", call_or("5"), "Adding numbers")
    await press(page, "Deny")
    assert tool_denied("Adding numbers") in await notes(page)
    [call] = await tools.store.tool_calls(await reply_id(page))
    assert (call.tool, call.result, call.is_error) == ("add", TOOL_DENIED_RESULT, True)
    details = await opened_details(page)
    assert details.startswith("add (round 1) — failed\n") and details.endswith(f"result: {TOOL_DENIED_RESULT}")
    assert console.errors == []


async def test_a_call_that_looks_like_markup_stays_text_in_the_disclosure(
    browser: BrowserContext, page_url: str, settings: Settings, tools: ConversationManager, console: Console
) -> None:
    page = await opened(browser, page_url)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    await ask_for_a_tool(page, settings, "Delete the file.", call_or("done", MARKUP_CALL), "Deleting a file")
    await press(page, "Run")
    # The small model, held to "call or say done", may ask again in the round without tools: the reply then
    # ends with the rounds line. Either way the call ran once, and its details are behind the disclosure.
    shown = await page.inner_text(".message.assistant .body")
    assert "deleted" not in shown and "<tool_call>" not in shown  # neither the call nor its result in the reply
    [call] = await tools.store.tool_calls(await reply_id(page))
    assert (call.tool, call.result, call.is_error) == ("delete_file", f"deleted {MARKUP}", False)

    for _ in range(2):  # as streamed, then as the stored history shows it after a reload
        text = await opened_details(page)
        assert text == f"delete_file (round 1)\narguments: {json.dumps({'path': MARKUP})}\nresult: deleted {MARKUP}"
        assert await page.locator(".message.assistant img").count() == 0  # markup in a call stays text
        assert (
            await page.locator(".message.assistant details.tools pre").evaluate("(node) => node.childElementCount") == 0
        )
        await page.reload()
        await page.wait_for_selector("body[data-ready=true]")
        await until(page, f"{LAST_REPLY}?.dataset.status && {LAST_REPLY}.dataset.status !== 'generating'")
    assert dialogs == [] and console.errors == []
