"""The Slack adapter end to end: the real slack-bolt AsyncApp over real sockets against tests/fake_slack.py,
with the real engine and small model. Exact outputs are forced with per-session grammars where needed."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from urllib.parse import urlencode

import aiohttp
import pytest
from slack_sdk.signature import SignatureVerifier

import adapters.slack.targets
from adapters.slack import SlackBot, run_slack
from adapters.slack.mrkdwn import from_slack, neutralize_markdown, to_mrkdwn
from bot.config import Secrets
from bot.errors import ConfigError
from bot.store import Status
from bot.types import SessionKey
from bot.wording import STOPPED_NOTE
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, TEAM_ID
from tests.slack_helpers import (
    ADMIN,
    REPLY_TIMEOUT_SECONDS,
    SIGNING_SECRET,
    answered,
    channel_key,
    command,
    direct_message,
    fake,
    mention,
    replies,
    running_bot,
    settled,
    words,
)

__all__ = ["fake"]  # the fixture, shared from tests.slack_helpers

# The access policy's words (bot.access), the same on every platform.
NOT_ALLOWED_USER = "🚫 Sorry, you're not on the list of people allowed to use this bot."
NOT_ALLOWED_CHANNEL = "🚫 I'm not enabled in this channel."
DMS_DISABLED = "🚫 Direct messages are turned off for this bot; mention me in a channel instead."
ADMINS_ONLY = (
    "🚫 Only admins (`admin_user_ids` under `[slack]` in config.toml) can change a channel's system "
    "prompt; in a DM with me it is yours to change."
)


# -- mentions and DMs ---------------------------------------------------------------------------------


async def test_mention_is_streamed_in_a_thread_with_several_updates(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 40), max_tokens=300, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "tell me something")
        await fake.wait_ack(await fake.push_event(event))
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    [stored] = await replies(manager, channel_key("C1", event["ts"]))  # the reply's thread is the conversation
    assert stored.status == Status.COMPLETE
    assert stored.content.split() == ["organization"] * 40
    assert reply.text == to_mrkdwn(stored.content)
    updates = [c for c in fake.calls_to("chat.update") if c.args["ts"] == reply.ts]
    assert len(updates) >= 3, "expected a status, then growing text, over several chat.update calls"
    shown = [v for v in reply.versions if "organization" in v]
    assert all(later.startswith(earlier.rstrip()) for earlier, later in itertools.pairwise(shown))
    user_message = (await manager.history(channel_key("C1", event["ts"])))[0]
    assert user_message.content == "tell me something"  # the bot's own mention is stripped


async def test_dm_is_answered_privately_and_own_echoes_are_ignored(manager, settings, fake):
    fake.echo_bot_messages = True  # Slack sends the bot its own posts and edits back as events
    async with running_bot(manager, settings, fake) as bot:
        event = direct_message("What is the capital of France?")
        await fake.wait_ack(await fake.push_event(event))
        [reply] = await answered(bot, fake, "D1")
        # The DM, the echo of the reply's post and one message_changed echo per edit: all acknowledged.
        await fake.wait_for(lambda: len(fake.acks) >= 1 + len(reply.versions), what="echoes acknowledged")

    assert reply.thread_ts is None  # a top-level DM is answered at the top level
    [stored] = await replies(manager, SessionKey.for_dm("slack", "U2"))
    assert stored.status == Status.COMPLETE and stored.content.strip()
    assert reply.text.startswith(to_mrkdwn(stored.content.rstrip()))
    assert len(fake.calls_to("chat.postMessage")) == 1, "the bot answered its own echo"
    assert await manager.history(channel_key("D1")) == []


async def test_mention_inside_a_thread_uses_that_threads_session(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "and in here?", thread_ts="1500000000.000001")
        await fake.wait_ack(await fake.push_event(event))
        await answered(bot, fake, "C1", thread_ts="1500000000.000001")

    assert len(await replies(manager, channel_key("C1", "1500000000.000001"))) == 1
    assert await manager.history(channel_key("C1")) == []


async def test_edits_and_deletions_are_acknowledged_but_not_answered(manager, settings, fake):
    async with running_bot(manager, settings, fake):
        for subtype in ("message_changed", "message_deleted"):
            event = {
                "type": "message",
                "subtype": subtype,
                "channel": "D1",
                "channel_type": "im",
                "ts": "1600000001.000001",
                "hidden": True,
                "message": {"type": "message", "user": "U2", "text": "edited", "ts": "1600000000.000009"},
            }
            await fake.wait_ack(await fake.push_event(event))
    assert [c.method for c in fake.calls if c.method.startswith("chat.")] == []


# -- dedupe ---------------------------------------------------------------------------------------------


async def test_redelivered_event_is_answered_once(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "hi")
        first = await fake.push_event(event, event_id="EvRETRY1")
        retry = await fake.push_event(event, event_id="EvRETRY1", retry_attempt=1)
        await fake.wait_ack(first)
        await fake.wait_ack(retry)
        await answered(bot, fake, "C1")

    assert len(fake.calls_to("chat.postMessage")) == 1
    assert [m.role for m in await manager.history(channel_key("C1", event["ts"]))] == ["user", "assistant"]


async def test_app_mention_and_message_events_for_one_message_answer_once(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "hi both")
        as_message = {**event, "type": "message", "channel_type": "channel"}
        acks = [await fake.push_event(event), await fake.push_event(as_message)]
        for envelope_id in acks:
            await fake.wait_ack(envelope_id)
        await answered(bot, fake, "C1")

    assert len(fake.calls_to("chat.postMessage")) == 1
    assert [m.role for m in await manager.history(channel_key("C1", event["ts"]))] == ["user", "assistant"]


# -- concurrency, length, rate limits, reconnects ------------------------------------------------------------


async def test_two_channels_are_answered_at_once(manager, settings, fake):
    for channel in ("C1", "C2"):
        await manager.set_sampling(
            channel_key(channel), grammar=words("organization", 20), max_tokens=200, repeat_penalty=1.0
        )
    async with running_bot(manager, settings, fake) as bot:
        first, second = mention("C1", "one"), mention("C2", "two")
        await fake.push_event(first)
        await fake.push_event(second)
        [one] = await answered(bot, fake, "C1", thread_ts=first["ts"])
        [two] = await answered(bot, fake, "C2", thread_ts=second["ts"])

    assert one.text.split() == two.text.split() == ["organization"] * 20
    # Each channel's reply was posted before the other's was finished: neither waited for the other.
    posted = {c.args["channel"]: c.at for c in fake.calls_to("chat.postMessage")}
    finished = {c.args["channel"]: c.at for c in fake.calls_to("chat.update")}
    assert posted["C1"] < finished["C2"] and posted["C2"] < finished["C1"]


async def test_replies_in_one_workspace_share_its_update_pace(manager, settings, fake):
    channels = ("C1", "C2", "C3")
    for channel in channels:
        await manager.set_sampling(
            channel_key(channel), grammar=words("organization", 40), max_tokens=400, repeat_penalty=1.0
        )
    async with running_bot(manager, settings, fake) as bot:
        events = [mention(channel, "go") for channel in channels]
        for event in events:
            await fake.push_event(event)
        for channel, event in zip(channels, events):
            [reply] = await answered(bot, fake, channel, thread_ts=event["ts"])
            assert reply.text.split() == ["organization"] * 40

    # Slack limits chat.postMessage / chat.update per workspace: three replies streaming at once share one
    # pace (edit_interval = 0.2 s here) instead of each assuming it has the whole budget.
    writes = sorted(c.at for c in fake.calls_to("chat.update") + fake.calls_to("chat.postMessage"))
    gaps = [round(b - a, 3) for a, b in zip(writes, writes[1:])]
    assert len(writes) >= 6
    # Arrival times jitter a little around the pace the bot keeps; three paces of their own would be 3x faster.
    assert writes[-1] - writes[0] >= 0.95 * 0.2 * len(gaps) and min(gaps) >= 0.1, gaps


# A reply's messages hold at most Slack's 3,000 characters of a section block; 1,000 here, so the model writes a
# third as much. " <<<<" is 5 characters from the model and 17 on Slack (" &lt;&lt;&lt;&lt;"): 80 of them make
# 400 characters that become 1,360, so the split must count Slack's length, or the message would be clipped.
@pytest.mark.parametrize(
    ("word", "count", "shown"),
    [("organization", 100, "organization"), ("<<<<", 80, "&lt;&lt;&lt;&lt;")],
    ids=["long", "escaped"],
)
async def test_long_answer_continues_in_a_new_message_in_the_same_thread(
    manager, settings, fake, monkeypatch, word, count, shown
):
    monkeypatch.setattr(adapters.slack.targets, "MAX_REPLY_CHARS", 1000)
    await manager.set_sampling(channel_key("C1"), grammar=words(word, count), max_tokens=600, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake, edit_interval=1.0) as bot:
        event = mention("C1", "write a lot")
        await fake.push_event(event)
        messages = await answered(bot, fake, "C1", thread_ts=event["ts"], count=2)

    assert len(messages) == 2
    assert all(len(m.text) <= 1000 for m in messages)  # each fits its message
    assert (messages[0].text + " " + messages[1].text).split() == [shown] * count


async def test_rate_limited_chat_update_is_retried_without_losing_or_duplicating(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 20), max_tokens=200, repeat_penalty=1.0)
    fake.rate_limit("chat.update", retry_after=1, times=1)
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "go")
        await fake.push_event(event)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    assert [c.status for c in fake.calls_to("chat.update")].count(429) == 1
    assert len(fake.calls_to("chat.postMessage")) == 1
    assert reply.text.split() == ["organization"] * 20


@pytest.mark.parametrize("method", ["chat.postMessage", "chat.update"])
async def test_msg_too_long_is_sent_again_shortened_and_the_final_text_still_shown(manager, settings, fake, method):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 20), max_tokens=200, repeat_penalty=1.0)
    fake.fail(method, "msg_too_long", times=1)
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "go")
        await fake.push_event(event)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    calls = fake.calls_to(method)
    refused = next(i for i, c in enumerate(calls) if c.error == "msg_too_long")
    assert calls[refused + 1].ok  # at once, not after a backoff
    assert reply.text.split() == ["organization"] * 20
    assert reply.blocks[0]["text"]["text"] == reply.text


async def test_blocks_slack_refuses_fall_back_to_plain_text(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 20), max_tokens=200, repeat_penalty=1.0)
    for method in ("chat.postMessage", "chat.update"):  # say this workspace takes no blocks at all
        fake.fail(method, "invalid_blocks", times=10**6, when=lambda args: bool(args.get("blocks")))
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "go")
        await fake.push_event(event)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    assert any(c.error == "invalid_blocks" for c in fake.calls)
    assert reply.text.split() == ["organization"] * 20 and reply.blocks == []  # shown, without buttons


async def test_socket_mode_disconnect_mid_stream_reconnects_and_keeps_the_reply(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 60), max_tokens=400, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "long one")
        await fake.push_event(event)
        await fake.wait_for(
            lambda: any("organization" in str(c.args.get("text")) for c in fake.calls_to("chat.update")),
            what="the reply streaming",
        )
        await fake.send_disconnect()
        await fake.wait_connected(2)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])
        after = mention("C1", "still there?")
        await fake.wait_ack(await fake.push_event(after))
        await answered(bot, fake, "C1", thread_ts=after["ts"])

    assert fake.connections_opened == 2
    assert reply.text.split() == ["organization"] * 60


async def test_model_output_cannot_ping_anyone(manager, settings, fake):
    await manager.set_sampling(
        channel_key("C1"), grammar='root ::= "Hi @everyone and <!channel> and <@U999> there"', max_tokens=60
    )
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "say hi to all")
        await fake.push_event(event)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    assert reply.text == "Hi @\u2060everyone and &lt;!channel&gt; and &lt;@U999&gt; there"
    for text in fake.texts_sent():
        assert "<!" not in text and "<@" not in text


async def test_markdown_reply_is_shown_as_mrkdwn(manager, settings, fake):
    await manager.set_sampling(
        channel_key("C1"),
        max_tokens=80,
        grammar=(
            'root ::= "## Plan\\nUse **bold** and *care*, see [docs](https://example.com/?a=1&b=2).\\n'
            '- one\\n```python\\nx = 1 < 2\\n```"'
        ),
    )
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C1", "format something")
        await fake.push_event(event)
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    assert reply.text == (
        "*Plan*\nUse *bold* and _care_, see <https://example.com/?a=1&amp;b=2|docs>.\n• one\n```\nx = 1 &lt; 2\n```"
    )


async def test_engine_failure_ends_the_reply_with_an_error_line_and_the_bot_keeps_going(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar="root ::= (")  # not valid GBNF: the engine refuses
    async with running_bot(manager, settings, fake) as bot:
        first = mention("C1", "break")
        await fake.push_event(first)
        [failed] = await answered(bot, fake, "C1", thread_ts=first["ts"])
        await manager.set_sampling(channel_key("C1"), grammar=None)
        second = mention("C1", "and now?")
        await fake.push_event(second)
        [fine] = await answered(bot, fake, "C1", thread_ts=second["ts"])

    assert failed.text.startswith("⚠️") and "grammar" in failed.text
    assert [r.status for r in await replies(manager, channel_key("C1", first["ts"]))] == [Status.FAILED]
    assert [r.status for r in await replies(manager, channel_key("C1", second["ts"]))] == [Status.COMPLETE]
    assert fine.text and not fine.text.startswith("⚠️")


# -- slash commands ---------------------------------------------------------------------------------------


async def test_ask_shows_the_question_and_streams_the_answer_into_it(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        ack_text = await command(fake, "/ask", "What is &lt;b&gt;2+2&lt;/b&gt;?", user="U1")  # as Slack sends it
        [message] = await answered(bot, fake, "C1")
        assert ack_text == ""  # nothing ephemeral: the answer is public
        reset_text = await command(fake, "/reset", user="U1")

    assert message.thread_ts is None
    assert message.text.startswith("*u1 asked:* What is &lt;b&gt;2+2&lt;/b&gt;?\n\n")
    assert all(version.startswith("*u1 asked:* What is") for version in message.versions)  # the header stays
    assert "Done" in reset_text
    assert await manager.history(channel_key("C1")) == []


async def test_ask_where_the_bot_cannot_post_tells_only_the_asker(manager, settings, fake):
    fake.fail("chat.postMessage", "not_in_channel")
    async with running_bot(manager, settings, fake) as bot:
        assert await command(fake, "/ask", "anyone?", channel="C7") == ""
        await fake.wait_for(lambda: fake.calls_to("response_url"), what="the ephemeral explanation")
        await settled(bot)

    [explained] = fake.calls_to("response_url")
    assert explained.args["response_type"] == "ephemeral" and "not_in_channel" in explained.args["text"]
    assert fake.messages_in("C7") == []


async def test_commands_ack_within_3_seconds_while_the_engine_is_busy(manager, settings, fake):
    busy = channel_key("C2")
    await manager.set_sampling(busy, grammar=words("organization", 400), max_tokens=1500, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake) as bot:
        event = mention("C2", "keep going")
        await fake.push_event(event)
        await fake.wait_for(
            lambda: any("organization" in str(c.args.get("text")) for c in fake.calls_to("chat.update")),
            what="the busy reply streaming",
        )

        status = await command(fake, "/status", channel="C2")
        assert "*Model:*" in status and "generating now" in status
        assert "helpful assistant" in await command(fake, "/system", channel="C2")
        assert await command(fake, "/system", "Talk like a pirate.", user="U1", channel="C2") == ADMINS_ONLY
        assert "set" in await command(fake, "/system", "Talk like a pirate.", user=ADMIN, channel="C2")
        assert await manager.system_prompt(busy) == "Talk like a pirate."
        assert "Stopping" in await command(fake, "/stop", channel="C2")
        [reply] = await answered(bot, fake, "C2", thread_ts=event["ts"])
        assert "Nothing" in await command(fake, "/stop", channel="C2")
        assert "default" in await command(fake, "/system", "default", user=ADMIN, channel="C2")
        assert "Done" in await command(fake, "/reset", channel="C2")

    assert reply.text.endswith(STOPPED_NOTE)
    assert reply.text.count("organization") < 400
    assert await manager.system_prompt(busy) == settings.conversation.system_prompt
    assert await manager.history(busy) == []


# -- access control ----------------------------------------------------------------------------------------


async def test_access_control_and_per_user_rate_limit(manager, settings, fake):
    async with running_bot(
        manager,
        settings,
        fake,
        allowed_channel_ids=["C1"],
        allowed_user_ids=["U1", "U2"],
        dms_enabled=False,
        user_messages_per_minute=1,
    ) as bot:
        for event in (mention("C9", "here?"), mention("C1", "me?", user="U3"), direct_message("psst")):
            await fake.wait_ack(await fake.push_event(event))
        await fake.wait_for(
            lambda: len(fake.calls_to("chat.postEphemeral")) == 2 and fake.messages_in("D1"), what="three refusals"
        )
        first = mention("C1", "first")
        await fake.push_event(first)
        await answered(bot, fake, "C1", thread_ts=first["ts"])
        await fake.push_event(mention("C1", "second, too soon"))
        await fake.wait_for(lambda: len(fake.calls_to("chat.postEphemeral")) == 3, what="rate-limit refusal")
        refused_ask = await command(fake, "/ask", "hello?", user="U3")

    ephemeral = [c.args["text"] for c in fake.calls_to("chat.postEphemeral")]
    assert sorted(ephemeral[:2]) == sorted([NOT_ALLOWED_CHANNEL, NOT_ALLOWED_USER])  # listeners run concurrently
    assert "try again in" in ephemeral[2]
    assert fake.messages_in("D1")[0].text == DMS_DISABLED
    assert refused_ask == NOT_ALLOWED_USER
    assert [m.content for m in await manager.history(channel_key("C1", first["ts"])) if m.role == "user"] == ["first"]


# -- native streaming ---------------------------------------------------------------------------------------


async def test_native_streaming_appends_and_stops_the_stream(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 40), max_tokens=300, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake, native_streaming=True) as bot:
        event = mention("C1", "stream it")
        await fake.push_event(event)
        await fake.wait_for(
            lambda: fake.calls_to("chat.stopStream"), timeout=REPLY_TIMEOUT_SECONDS, what="the stream to stop"
        )
        await settled(bot)

    [reply] = fake.messages_in("C1", event["ts"])  # the "Thinking…" placeholder was deleted
    [stored] = await replies(manager, channel_key("C1", event["ts"]))
    assert reply.text == neutralize_markdown(stored.content)
    assert reply.text.split() == ["organization"] * 40
    start = fake.calls_to("chat.startStream")[0].args
    assert (start["recipient_user_id"], start["recipient_team_id"]) == ("U1", TEAM_ID)
    assert len(fake.calls_to("chat.appendStream")) >= 1
    assert fake.calls_to("chat.delete", ok_only=True)


async def test_expired_native_stream_is_finished_with_chat_update(manager, settings, fake):
    await manager.set_sampling(channel_key("C1"), grammar=words("organization", 60), max_tokens=400, repeat_penalty=1.0)
    async with running_bot(manager, settings, fake, native_streaming=True) as bot:
        event = mention("C1", "stream it")
        await fake.push_event(event)
        await fake.wait_for(
            lambda: fake.calls_to("chat.appendStream"), timeout=REPLY_TIMEOUT_SECONDS, what="the stream to start"
        )
        fake.expire_streams()
        await settled(bot)

    assert any(c.error == "message_not_in_streaming_state" for c in fake.calls)
    [reply] = fake.messages_in("C1", event["ts"])
    assert reply.text.split() == ["organization"] * 60
    assert fake.calls_to("chat.update")[-1].args["ts"] == reply.ts


# -- HTTP (Events API) mode -----------------------------------------------------------------------------------


def signed(
    body: str,
    *,
    timestamp: int | None = None,
    secret: str = SIGNING_SECRET,
    content_type: str = "application/json",
    retry_num: int | None = None,
) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": str(timestamp),
        "X-Slack-Signature": SignatureVerifier(secret).generate_signature(timestamp=str(timestamp), body=body),
    }
    if retry_num is not None:
        headers |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
    return headers


async def test_http_mode_verifies_signatures(manager, settings, fake):
    # Port 0 lets the OS pick a free port.
    settings.slack.http_port = 0
    async with running_bot(manager, settings, fake, socket_mode=False) as bot, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{bot.http_port}{settings.slack.http_path}"
        calls_before = len(fake.calls)

        forged_event = mention("C1", "forged")
        forged = json.dumps(fake.event_body(forged_event, event_id="EvBAD"))
        async with http.post(url, data=forged, headers=signed(forged, secret="wrong-secret")) as resp:
            assert resp.status == 401
        stale = json.dumps(fake.event_body(mention("C1", "stale"), event_id="EvOLD"))
        async with http.post(url, data=stale, headers=signed(stale, timestamp=int(time.time()) - 600)) as resp:
            assert resp.status == 401
        assert len(fake.calls) == calls_before
        assert await manager.history(channel_key("C1", forged_event["ts"])) == []

        challenge = json.dumps({"type": "url_verification", "challenge": "abc123", "token": "x"})
        async with http.post(url, data=challenge, headers=signed(challenge)) as resp:
            assert resp.status == 200 and (await resp.json())["challenge"] == "abc123"

        event = mention("C1", "over http")
        good = json.dumps(fake.event_body(event, event_id="EvHTTP"))
        async with http.post(url, data=good, headers=signed(good)) as resp:
            assert resp.status == 200
        async with http.post(url, data=good, headers=signed(good, retry_num=1)) as resp:
            assert resp.status == 200  # Slack's retry: acknowledged, not answered again
        await answered(bot, fake, "C1", thread_ts=event["ts"])

        form = urlencode(fake.command_body("/status", channel="C1"))
        async with http.post(
            url, data=form, headers=signed(form, content_type="application/x-www-form-urlencoded")
        ) as resp:
            assert resp.status == 200 and "*Model:*" in await resp.text()  # a text-only ack is a plain body

    assert len(fake.calls_to("chat.postMessage")) == 1
    assert [m.content for m in await manager.history(channel_key("C1", event["ts"]))][:1] == ["over http"]


# -- running it ----------------------------------------------------------------------------------------------


async def test_http_mode_on_a_taken_port_is_one_line_naming_the_key(manager, settings, fake):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"port {port}\b.*\[slack\] http_port") as error:
            async with running_bot(manager, settings, fake, socket_mode=False, http_port=port):
                pass
    assert "\n" not in str(error.value)


async def test_run_slack_serves_until_cancelled_then_disconnects(manager, settings, fake):
    settings.slack.api_base_url = fake.base_url
    task = asyncio.create_task(
        run_slack(manager, settings, Secrets(slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN))
    )
    await fake.wait_connected()
    await fake.wait_ack(await fake.push_command("/status"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.open_sockets == 0


async def test_a_rejected_bot_token_fails_at_start(manager, settings, fake):
    settings.slack.api_base_url = fake.base_url
    bot = SlackBot(manager, settings.slack, bot_token="xoxb-revoked", app_token=APP_TOKEN)
    with pytest.raises(ConfigError, match="invalid_auth"):
        await bot.start()
    assert fake.connections_opened == 0


@pytest.mark.parametrize(
    ("markdown", "mrkdwn"),
    [
        ("**bold** __also__ *it* _it_ ~~gone~~", "*bold* *also* _it_ _it_ ~gone~"),
        ("[site](https://a.example/x) <https://b.example>", "<https://a.example/x|site> <https://b.example>"),
        ("[trap](!channel) [trap2](<@U1>)", "trap (!channel) trap2 (&lt;@U1&gt;)"),
        ("# Title\n* item\n  - sub\n> quote <!here>", "*Title*\n• item\n  • sub\n> quote &lt;!here&gt;"),
        ("`a<b` and\n```js\ncode & <!everyone>", "`a&lt;b` and\n```\ncode &amp; &lt;!everyone&gt;\n```"),
        ("snake_case_name and 2*3*4", "snake_case_name and 2*3*4"),
        ("hey @channel and @Here", "hey @\u2060channel and @\u2060Here"),
    ],
)
def test_markdown_to_mrkdwn(markdown: str, mrkdwn: str) -> None:
    assert to_mrkdwn(markdown) == mrkdwn


def test_slack_markup_to_plain_text() -> None:
    text = "<@UBOT> hi <@U2|bob>, see <#C1|general> &lt;tag&gt; <https://x.example|site> <!here>"
    assert from_slack(text, "UBOT") == "hi @bob, see #general <tag> site (https://x.example) @here"


async def test_the_connection_is_reported_for_readiness(manager, settings, fake):
    async with running_bot(manager, settings, fake):
        assert manager.platforms.status()["slack"] is True
    assert manager.platforms.status()["slack"] is False
