"""`make e2e`: Debian's headless Chromium, driven by Playwright through its executable path, uses the real page
served by the real web adapter with the real engine. Run `bash tests_e2e/install.sh` first (no browser download).

The page runs under its real Content-Security-Policy (no ``bypass_csp``): every test fails on a console error,
so a script, style or image the CSP refuses is caught. Waits poll with ``page.evaluate`` (DevTools protocol,
outside the page's CSP) because ``wait_for_function`` would need the ``eval`` the CSP forbids.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image
from playwright.async_api import BrowserContext, ConsoleMessage, Page, async_playwright, expect

from adapters.web import WebServer, create_app
from bot.config import SamplingSettings, Secrets, Settings
from bot.conversations import ConversationManager
from bot.wording import REASONING, cannot_see_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "web-chat.png"
TIMEOUT_SECONDS = 120.0  # the machine is shared and may be slow; every wait is on a condition

QUESTION = "How do I start llamarelay?"
# A Markdown opening, then a long tail: the reply is known, shows formatting, and runs long enough to Stop.
REPLY_GRAMMAR = r"""root ::= intro list code tail
intro ::= "Here is **the short version**:\n\n"
list ::= "1. Put a GGUF model in `models/`\n2. Run `make run`\n\n"
code ::= "```sh\nllamarelay web\n```\n\nThen open the page. "
tail ::= ("Each step streams its words as they are written. "){120}"""
URL_REPLY = (
    "The official site is https://www.python.org/ and the docs are at https://docs.python.org/3/ "
    "(see [the tutorial](https://docs.python.org/3/tutorial/))."
)

# 50 list levels (2 nesting levels each): markdown-it's maxNesting (100) is reached at the last one. The
# one-line form is short enough for the test model's context; the indented one is rendered in the page.
DEEP_LINE = "- " * 50 + "deep"
DEEP_LIST = "".join(f"{'  ' * level}- level {level}\n" for level in range(50))
SENTINEL = "Sentinel: nothing lost."
FRENCH = "Always answer in French."

LAST_REPLY = "[...document.querySelectorAll('.message.assistant')].at(-1)"
# What render() may produce (markdown.js allows these and sets target/rel on links itself).
ALLOWED_TAGS = {
    "p",
    "br",
    "strong",
    "em",
    "s",
    "code",
    "pre",
    "a",
    "ul",
    "ol",
    "li",
    "blockquote",
    "hr",
    "h3",
    "h4",
    "h5",
    "h6",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
}
ALLOWED_ATTRIBUTES = {"href", "class", "start", "target", "rel"}
SAFE_HREF = re.compile(r"(?:https?|mailto):", re.IGNORECASE)

# Renders text into a box on the page (so the CSP sees the result live) and describes what came out.
RENDER = """(text) => {
    const box = document.createElement('div');
    document.body.append(box);
    let threw = null;
    try {
        box.append(LlamarelayMarkdown.render(text));
    } catch (error) {
        threw = String(error);
    }
    const all = [...box.querySelectorAll('*')];
    const result = {
        threw,
        html: box.innerHTML,
        text: box.textContent,
        tags: [...new Set(all.map((node) => node.localName))],
        attributes: [...new Set(all.flatMap((node) => [...node.attributes].map((a) => a.name)))],
        links: [...box.querySelectorAll('a')].map((a) => ({href: a.getAttribute('href'), text: a.textContent,
                                                          target: a.target, rel: a.rel})),
    };
    box.remove();
    return result;
}"""


class Console:
    """Every console error and uncaught exception of the context's pages (a CSP refusal is a console error)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def watch(self, page: Page) -> None:
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
async def page_url(manager: ConversationManager, settings: Settings) -> AsyncIterator[str]:
    settings.sampling = SamplingSettings(max_tokens=1500, temperature=0.0, seed=1, grammar=REPLY_GRAMMAR)
    settings.web.edit_interval = 0.1
    server = WebServer(create_app(manager, settings, Secrets()), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.url
    finally:
        await manager.shutdown()
        await server.close()


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
async def browser(tmp_path: Path, console: Console) -> AsyncIterator[BrowserContext]:
    assert CHROMIUM.exists(), "run `bash tests_e2e/install.sh` (installs Debian's chromium)"
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 760},
        )
        context.set_default_timeout(TIMEOUT_SECONDS * 1000)
        for page in context.pages:
            console.watch(page)
        context.on("page", console.watch)
        try:
            yield context
        finally:
            await context.close()


async def until(page: Page, expression: str) -> Any:
    """Poll a JavaScript expression until it is truthy; return its value."""
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not (value := await page.evaluate(expression)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        await asyncio.sleep(0.05)
    return value


async def reply_text(page: Page) -> str:
    return str(await page.evaluate(f"{LAST_REPLY}?.querySelector('.body').textContent ?? ''"))


async def opened(context: BrowserContext, url: str) -> Page:
    page = context.pages[0] if context.pages else await context.new_page()
    await page.goto(url)
    await page.wait_for_selector("body[data-ready=true]")
    return page


async def ask_and_stop(page: Page, text: str) -> None:
    """Send ``text``, wait for the reply's first words, stop it."""
    await page.fill("#input", text)
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.querySelector('.body').textContent.length > 0")
    await page.click("#stop")
    await until(page, f"{LAST_REPLY}.dataset.status === 'stopped'")


async def test_chat_streams_stops_and_survives_a_reload(
    browser: BrowserContext, page_url: str, console: Console
) -> None:
    page = await opened(browser, page_url)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))

    await page.fill("#input", QUESTION)
    await page.press("#input", "Enter")

    # The reply grows while it is written: two observations, the second longer than the first.
    await until(page, f"{LAST_REPLY}?.querySelector('.body').textContent.length > 0")
    first = await reply_text(page)
    await until(
        page,
        f"(t => t.length > {len(first)} && t.split('Each step').length > 3)"
        f"({LAST_REPLY}.querySelector('.body').textContent)",
    )
    second = await reply_text(page)
    assert len(second) > len(first) > 0 and second.startswith(first[: len(first) // 2])
    assert await page.evaluate(f"{LAST_REPLY}.dataset.status") == "generating"

    await page.click("#stop")
    await until(page, f"{LAST_REPLY}.dataset.status === 'stopped'")
    stopped = await reply_text(page)
    assert "llamarelay web" in stopped and "⏹️ Stopped." in await page.inner_text(".message.assistant .notes")
    await expect(page.locator("#stop")).to_be_disabled()
    # The Markdown came out as elements, not as asterisks and backticks.
    reply = page.locator(".message.assistant .body").last
    assert await reply.locator("strong").inner_text() == "the short version"
    assert await reply.locator("ol li").count() == 2
    assert await reply.locator("pre code").inner_text() == "llamarelay web\n"  # CommonMark keeps the newline

    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'stopped'")
    assert await page.inner_text(".message.user .body") == QUESTION
    assert await reply_text(page) == stopped
    assert await page.locator("#conversations a").first.inner_text() == QUESTION
    # A stopped answer is the latest one, and it can go on: both buttons stand beside Stop.
    await expect(page.locator("#regenerate")).to_be_visible()
    await expect(page.locator("#continue")).to_be_visible()

    # The screenshot in the README: the new controls, and a file waiting to go with the next question.
    await page.set_input_files(
        "#files", [{"name": "config.toml", "mimeType": "text/plain", "buffer": b"[web]\nport = 8080\n"}]
    )
    await page.fill("#input", "What does this config change?")
    await expect(page.locator("#attachments li")).to_have_text(["📎 config.toml×"])
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT))
    assert dialogs == [] and console.errors == []


async def test_regenerate_replaces_the_latest_answer(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.sampling = SamplingSettings(max_tokens=40, temperature=0.0, seed=1, grammar='root ::= "First answer."')
    page = await opened(browser, page_url)
    await page.fill("#input", "Answer me.")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    await expect(page.locator("#regenerate")).to_be_visible()
    await expect(page.locator("#continue")).to_be_hidden()  # a whole answer: nothing to continue

    settings.sampling = SamplingSettings(max_tokens=40, temperature=0.0, seed=1, grammar='root ::= "Second answer."')
    await page.click("#regenerate")
    await until(page, f"{LAST_REPLY}.dataset.status === 'complete' && {LAST_REPLY}.dataset.text === 'Second answer.'")
    await expect(page.locator("#regenerate")).to_be_visible()

    async def check() -> None:
        texts = await page.evaluate("[...document.querySelectorAll('.message')].map((m) => m.dataset.text)")
        assert texts == ["Answer me.", "Second answer."]

    await check()
    await page.reload()  # the stored history kept only the new answer
    await page.wait_for_selector("body[data-ready=true]")
    await check()
    await expect(page.locator("#regenerate")).to_be_visible()
    await expect(page.locator("#continue")).to_be_hidden()
    assert console.errors == []


async def test_continue_grows_an_answer_cut_by_the_length_limit(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.sampling = SamplingSettings(
        max_tokens=6, temperature=0.0, seed=1, grammar='root ::= ("one two three "){40}'
    )
    page = await opened(browser, page_url)
    await page.fill("#input", "Count.")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    assert "reached the reply length limit" in await page.inner_text(".message.assistant .notes")
    await expect(page.locator("#continue")).to_be_visible()
    cut = await page.evaluate(f"{LAST_REPLY}.dataset.text")
    assert cut and "one two three".startswith(cut.strip()[:5])

    settings.sampling = SamplingSettings(max_tokens=40, temperature=0.0, seed=1, grammar='root ::= "and so on."')
    await page.click("#continue")
    await until(page, f"{LAST_REPLY}.dataset.status === 'complete' && {LAST_REPLY}.dataset.text.endsWith('so on.')")
    assert await page.evaluate(f"{LAST_REPLY}.dataset.text") == cut + "and so on."
    assert await page.inner_text(".message.assistant .notes") == ""
    await expect(page.locator("#continue")).to_be_hidden()
    await expect(page.locator("#regenerate")).to_be_visible()

    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    assert await page.locator(".message").count() == 2
    assert await page.evaluate(f"{LAST_REPLY}.dataset.text") == cut + "and so on."
    await expect(page.locator("#continue")).to_be_hidden()
    assert console.errors == []


async def test_files_go_with_a_message(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.conversation.max_file_bytes = 1000
    settings.sampling = SamplingSettings(max_tokens=40, temperature=0.0, seed=1, grammar='root ::= "Read them."')
    page = await opened(browser, page_url)
    uploads: list[int] = []
    page.on(
        "request",
        lambda request: (
            uploads.append(len(request.post_data_buffer or b"")) if request.url.endswith("/messages") else None
        ),
    )
    await page.set_input_files(
        "#files",
        [
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": "buy milk\nrésumé".encode()},
            {"name": "archive.zip", "mimeType": "application/zip", "buffer": b"PK\x03\x04\x00\x00"},
        ],
    )
    await page.set_input_files(
        "#files",
        [
            {"name": "big.log", "mimeType": "", "buffer": b"x" * 50_000},
            {"name": "oops.txt", "mimeType": "text/plain", "buffer": b"not this"},
        ],
    )
    await page.click("button[aria-label='Remove oops.txt']")
    chips = ["📎 notes.txt×", "📎 archive.zip×", "📎 big.log×"]
    await expect(page.locator("#attachments li")).to_have_text(chips)

    await page.fill("#input", "Summarize the files.")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    stored = "Summarize the files.\n\nFile notes.txt:\n```\nbuy milk\nrésumé\n```"

    async def check() -> None:
        assert await page.inner_text(".message.user .body") == stored  # what the model read
        assert await page.evaluate(f"{LAST_REPLY}.dataset.text") == "Read them."

    await until(page, "document.querySelector('.message.user .body').textContent.includes('File notes.txt')")
    await check()
    assert await page.locator(".message.assistant .notes p").all_inner_texts() == [
        "📎 I skipped archive.zip: not a text file.",
        "📎 I skipped big.log: larger than 1 kB.",
    ]
    assert await page.locator("#attachments li").count() == 0 and await page.input_value("#input") == ""
    assert len(uploads) == 1 and uploads[0] < 5000  # of the 50 kB log only its first kilobyte travelled
    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    await check()
    assert console.errors == []


async def test_a_pasted_picture_goes_with_the_message(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.sampling = SamplingSettings(max_tokens=40, temperature=0.0, seed=1, grammar='root ::= "A picture."')
    page = await opened(browser, page_url)
    out = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 0, 0)).save(out, "PNG")
    # The clipboard holds an image, as after "Copy image" or a screenshot: pasting attaches it.
    await page.focus("#input")
    await page.evaluate(
        """(bytes) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], 'screenshot.png', {type: 'image/png'}));
        document.querySelector('#input').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
    }""",
        list(out.getvalue()),
    )
    await expect(page.locator("#attachments li")).to_have_text(["📎 screenshot.png×"])
    await page.fill("#input", "What is this?")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")
    # The small model has no vision: the picture reached the core, which says so rather than dropping it.
    assert await page.locator(".message.assistant .notes p").all_inner_texts() == [cannot_see_images([])]
    await until(page, "document.querySelector('.message.user .body').textContent.includes('screenshot.png')")
    assert await page.inner_text(".message.user .body") == "What is this?\n\n🖼️ screenshot.png"
    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    assert await page.inner_text(".message.user .body") == "What is this?\n\n🖼️ screenshot.png"
    assert console.errors == []


async def test_a_reasoning_model_shows_its_status_then_the_answer(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.sampling = SamplingSettings(
        max_tokens=600,
        temperature=0.0,
        seed=1,
        grammar='root ::= "<think>" ([a-z]{3,6} " "){80} "</think>" "Yes, it is."',
    )
    page = await opened(browser, page_url)
    await page.fill("#input", "Is it?")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.querySelector('.status').textContent === '{REASONING}'")
    assert await reply_text(page) == ""  # the reasoning itself is not shown
    await until(page, f"{LAST_REPLY}.dataset.status === 'complete'")
    assert await page.evaluate(f"{LAST_REPLY}.dataset.text") == "Yes, it is."
    assert await page.evaluate(f"{LAST_REPLY}.querySelector('.status').textContent") == ""
    assert console.errors == []


async def test_the_page_runs_under_its_real_csp(browser: BrowserContext, page_url: str, console: Console) -> None:
    page = await opened(browser, page_url)
    assert console.errors == []  # the page itself, its vendored libraries and its first render break no rule
    # An injected inline script is refused, and the refusal is seen: these tests would catch a violation.
    ran = await page.evaluate("""() => {
        const script = document.createElement('script');
        script.textContent = 'window.injected = true';
        document.body.append(script);
        return window.injected === true;
    }""")
    assert ran is False
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while not any("Content Security Policy" in error for error in console.errors):
        assert time.monotonic() < deadline, console.errors
        await asyncio.sleep(0.05)


async def test_a_bare_url_in_a_reply_renders_and_survives_a_reload(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    settings.sampling = SamplingSettings(max_tokens=200, temperature=0.0, seed=1, grammar=f'root ::= "{URL_REPLY}"')
    page = await opened(browser, page_url)
    await page.fill("#input", "Where is Python's website?")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")

    async def check() -> None:
        assert await page.locator(".message").count() == 2
        assert (await reply_text(page)).strip() == URL_REPLY.replace(
            "[the tutorial](https://docs.python.org/3/tutorial/)", "the tutorial"
        )
        links = await page.evaluate(f"[...{LAST_REPLY}.querySelectorAll('a')].map(a => [a.href, a.target, a.rel])")
        rel = "noopener noreferrer nofollow"
        assert links == [
            ["https://www.python.org/", "_blank", rel],
            ["https://docs.python.org/3/", "_blank", rel],
            ["https://docs.python.org/3/tutorial/", "_blank", rel],
        ]
        assert await page.is_hidden("#banner")

    await check()
    assert await page.input_value("#input") == ""
    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    await check()
    assert console.errors == []


async def test_a_render_error_keeps_the_stored_messages_on_the_page(
    browser: BrowserContext, page_url: str, console: Console
) -> None:
    page = await opened(browser, page_url)
    # Whatever breaks the renderer (it should never throw), the page shows the reply as plain text.
    await page.evaluate("() => { LlamarelayMarkdown.render = () => { throw new Error('renderer broke'); }; }")
    await page.fill("#input", QUESTION)
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.querySelector('.body').textContent.includes('`make run`')")
    await page.click("#stop")
    await until(page, f"{LAST_REPLY}.dataset.status === 'stopped'")
    assert await page.locator(".message").count() == 2
    assert await page.inner_text(".message.user .body") == QUESTION
    assert (await reply_text(page)).startswith("Here is **the short version**:\n\n1. Put a GGUF model in `models/`")
    assert await page.input_value("#input") == "" and await page.is_hidden("#banner")
    assert console.errors == []


async def test_a_link_from_another_site_keeps_the_conversations(
    browser: BrowserContext, page_url: str, console: Console
) -> None:
    page = await opened(browser, page_url)
    await ask_and_stop(page, QUESTION)
    await until(page, "document.querySelector('#conversations a')?.textContent")
    before = {c["name"]: c["value"] for c in await browser.cookies(page_url)}

    # Another site (localhost is not the same site as 127.0.0.1) links to the chat, as a wiki or e-mail would.
    foreign = web.Application()

    async def link_page(_: web.Request) -> web.Response:
        return web.Response(
            text=f'<!doctype html><link rel="icon" href="data:,"><a id="chat" href="{page_url}">our chat</a>',
            content_type="text/html",
        )

    foreign.router.add_get("/", link_page)
    runner = web.AppRunner(foreign)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await page.goto(f"http://localhost:{port}/")
        await page.click("#chat")
        await page.wait_for_url(f"{page_url}**")
        await page.wait_for_selector("body[data-ready=true]")  # the list is loaded by then
        assert await page.locator("#conversations a").all_inner_texts() == [QUESTION]
        assert await page.inner_text(".message.user .body") == QUESTION
        assert {c["name"]: c["value"] for c in await browser.cookies(page_url)} == before
    finally:
        await runner.cleanup()
    assert console.errors == []


async def test_markdown_renders_safely(browser: BrowserContext, page_url: str, console: Console) -> None:
    page = await opened(browser, page_url)
    fired: list[str] = []
    page.on("dialog", lambda dialog: fired.append(dialog.message))
    html = await page.evaluate(
        RENDER,
        "\n".join(
            [
                "<img src=x onerror=alert(1)> **bold <script>alert(2)</script>**",
                '[click](javascript:alert(3)) [ok](https://example.org/a?b=1) <a href="javascript:alert(4)">x</a>',
                "- one *two* `<b>code</b>`",
                "- three",
                "```html",
                "<script>alert(5)</script>",
                "```",
                "![tracker](https://example.org/pixel.png) see https://example.com or write to someone@example.org",
                "| a | b |",
                "|--:|:-:|",
                "| 1 | 2 |",
            ]
        ),
    )
    assert html["threw"] is None
    assert set(html["tags"]) <= ALLOWED_TAGS and set(html["attributes"]) <= ALLOWED_ATTRIBUTES, html
    assert [link["href"] for link in html["links"]] == [
        "https://example.org/a?b=1",
        "https://example.org/pixel.png",
        "https://example.com",
        "mailto:someone@example.org",
    ]
    assert "<img src=x onerror=alert(1)>" in html["text"] and "&lt;img" in html["html"]
    assert "bold <script>alert(2)</script>" in html["text"] and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html["html"]
    assert '<pre><code class="language-html">&lt;script&gt;alert(5)&lt;/script&gt;' in html["html"]
    assert 'class="align-right"' in html["html"] and "style=" not in html["html"]

    # User text typed into the page stays text too (it is never sent through the Markdown renderer).
    await page.fill("#input", "<img src=x onerror=alert(6)>")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.querySelector('.body').textContent.length > 0")
    await page.click("#stop")
    await until(page, f"{LAST_REPLY}.dataset.status === 'stopped'")
    assert await page.inner_text(".message.user .body") == "<img src=x onerror=alert(6)>"
    assert await page.locator("#messages img").count() == 0
    assert fired == [] and console.errors == []


async def test_a_system_prompt_saved_before_the_first_message_is_kept(
    browser: BrowserContext, page_url: str, console: Console
) -> None:
    page = await opened(browser, page_url)
    assert await page.locator("#conversations a").count() == 0  # a fresh page: no conversation yet
    await page.click("#system summary")
    await page.fill("#system-prompt", FRENCH)
    await page.click("#system-save")
    await expect(page.locator("#system-saved")).to_have_text("Saved.")
    assert await page.input_value("#system-prompt") == FRENCH

    async def stored() -> str:
        conversation = await page.evaluate(
            "async () => (await fetch(`/api/conversations/${location.hash.slice(1)}`,"
            " {credentials: 'same-origin'})).json()"
        )
        return str(conversation["system_prompt"])

    assert await stored() == FRENCH  # the one the model reads
    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    assert await page.input_value("#system-prompt") == FRENCH
    assert await stored() == FRENCH
    assert console.errors == []


async def test_markdown_nested_past_the_limit_keeps_the_rest_of_the_reply(
    browser: BrowserContext, page_url: str, settings: Settings, console: Console
) -> None:
    reply = f"Here is **a list**:\n\n{DEEP_LINE}\n\n{SENTINEL}"
    settings.sampling = SamplingSettings(
        max_tokens=400, temperature=0.0, seed=1, grammar=f"root ::= {json.dumps(reply)}"
    )
    page = await opened(browser, page_url)
    await page.fill("#input", "Nest a list.")
    await page.press("#input", "Enter")
    await until(page, f"{LAST_REPLY}?.dataset.status === 'complete'")

    async def check() -> None:
        assert await page.evaluate(f"{LAST_REPLY}.dataset.text") == reply
        body = page.locator(".message.assistant .body").last
        assert SENTINEL in await body.inner_text()
        await expect(body.get_by_text(SENTINEL)).to_be_in_viewport()
        # Markdown up to the limit, plain text from there on.
        assert await body.locator("strong").inner_text() == "a list"
        assert await body.locator("p.plain").inner_text() == f"{DEEP_LINE}\n\n{SENTINEL}"

    await check()
    await page.reload()
    await page.wait_for_selector("body[data-ready=true]")
    await check()

    out = await page.evaluate(RENDER, f"{DEEP_LIST}\n{SENTINEL}")  # the deepest item, then the sentinel, are text
    assert out["html"].count("<ul>") == 49 and SENTINEL in out["text"]
    # Past the limit the text stays text: no markup from it reaches the page, in blockquotes as in lists.
    out = await page.evaluate(RENDER, "> " * 100 + "deep\n\n<img src=x onerror=alert(1)> **after**")
    assert out["threw"] is None and set(out["tags"]) <= ALLOWED_TAGS and set(out["attributes"]) <= ALLOWED_ATTRIBUTES
    assert "deep" in out["text"] and "<img src=x onerror=alert(1)> **after**" in out["text"]
    assert console.errors == []


# -- the renderer, property-tested in the page -----------------------------------------------------------

MARKDOWN_PIECES = st.sampled_from(
    [
        "see https://example.com",
        "https://www.python.org/",
        "www.example.org/a_(b)",
        "http://x",
        "mailto:a@b.c",
        "a@b.co",
        "[label](https://example.com)",
        "[x](javascript:alert(1))",
        "[x](data:text/html,<b>)",
        "[https://a.b](https://c.d)",
        "<https://e.f>",
        "![i](https://g.h/i.png)",
        "```",
        "```py\n",
        "~~~",
        "`",
        "``",
        "**",
        "*",
        "_",
        "__",
        "~~",
        "> ",
        "- ",
        "1. ",
        "# ",
        "\n",
        "\n\n",
        "    ",
        "| a |\n|---|\n| b |",
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        '<a href="javascript:alert(1)">x</a>',
        "<style>*{}</style>",
        "&lt;",
        "&#x3c;script&#x3e;",
        "\\",
        "\u0000",
        "\u202e",
        "\ufeff",
        "é",
        "👩‍👩‍👧",
        "漢字",
        "e\u0301",
        "\u200b",
        "<!--",
        "-->",
    ]
)
MARKDOWN_TEXT = st.lists(st.one_of(MARKDOWN_PIECES, st.text(max_size=20)), max_size=30).map("".join)
# No Markdown syntax at all: letters, digits, spaces, line breaks and calm punctuation, any script.
PLAIN_TEXT = st.text(st.characters(categories=("L", "N", "Zs"), include_characters="\n,;?'\""), max_size=200)
PROPERTY_SETTINGS = hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
async def render_page(browser: BrowserContext, page_url: str) -> Page:
    return await opened(browser, page_url)


@pytest.fixture
def no_console_errors(console: Console) -> Iterator[None]:
    yield
    assert console.errors == []


@PROPERTY_SETTINGS
@given(text=MARKDOWN_TEXT)
async def test_render_is_total_and_safe_for_any_text(render_page: Page, no_console_errors: None, text: str) -> None:
    out = await render_page.evaluate(RENDER, text)
    assert out["threw"] is None
    assert set(out["tags"]) <= ALLOWED_TAGS, out["html"]
    assert set(out["attributes"]) <= ALLOWED_ATTRIBUTES, out["html"]  # no on* handler, no style
    for link in out["links"]:
        assert SAFE_HREF.match(link["href"]) and link["target"] == "_blank", link
        assert link["rel"] == "noopener noreferrer nofollow", link


@PROPERTY_SETTINGS
@given(text=PLAIN_TEXT)
async def test_render_keeps_plain_text_as_it_is(render_page: Page, no_console_errors: None, text: str) -> None:
    out = await render_page.evaluate(RENDER, text)
    assert out["threw"] is None
    assert out["text"].split() == text.split()
