"""Files shared with a mention or a DM: text read into the prompt, the rest skipped with a visible line."""

from __future__ import annotations

from adapters.slack.mrkdwn import to_mrkdwn
from bot.types import SessionKey
from tests.fake_slack import BOT_USER_ID, FakeMessage
from tests.slack_helpers import answered, channel_key, fake, running_bot

__all__ = ["fake"]


def shown(message: FakeMessage) -> str:
    return str(message.blocks[0]["text"]["text"])


async def test_text_files_on_a_mention_are_read_and_the_rest_skipped_with_a_line(manager, settings, fake):
    settings.conversation.max_file_bytes = 1000
    await manager.set_sampling(channel_key("C1"), grammar='root ::= "Looks fine."', max_tokens=30)
    files = [
        fake.add_file("notes.md", b"# Plan\r\nship it"),
        fake.add_file("archive.zip", b"PK\x03\x04", "application/zip"),
        fake.add_file("big.log", b"x" * 5000),
        fake.add_file("small-but-not.txt", b"y" * 5000, size=10),  # Slack's size is wrong: still cut off
    ]
    elsewhere = fake.add_file("elsewhere.txt", b"secret")
    elsewhere["url_private_download"] = elsewhere["url_private"].replace("127.0.0.1", "localhost")
    async with running_bot(manager, settings, fake) as bot:
        event = fake.user_message("C1", f"<@{BOT_USER_ID}> review these", files=[*files, elsewhere])
        await fake.push_event({**event, "type": "app_mention"})
        [reply] = await answered(bot, fake, "C1", thread_ts=event["ts"])

    [asked] = [m for m in await manager.history(channel_key("C1", event["ts"])) if m.role == "user"]
    assert asked.content == "review these\n\nFile notes.md:\n```\n# Plan\nship it\n```"
    assert shown(reply) == to_mrkdwn(
        "Looks fine.\n\n"
        + "\n".join(
            [
                "📎 I skipped archive.zip: not a text file.",
                "📎 I skipped big.log: larger than 1 kB.",
                "📎 I skipped small-but-not.txt: larger than 1 kB.",
                "📎 I skipped elsewhere.txt: not stored on Slack.",
            ]
        )
    )
    assert sorted(fake.downloads) == ["notes.md", "small-but-not.txt"]  # nothing too big or binary was fetched


async def test_a_file_alone_in_a_dm_is_the_message(manager, settings, fake):
    async with running_bot(manager, settings, fake) as bot:
        event = fake.user_message(
            "D1", "", user="U2", files=[fake.add_file("hello.py", b"print('hi')\n", "text/x-python")]
        )
        await fake.push_event(event)
        await answered(bot, fake, "D1")

    [asked] = [m for m in await manager.history(SessionKey.for_dm("slack", "U2")) if m.role == "user"]
    assert asked.content == "File hello.py:\n```\nprint('hi')\n```"
    assert fake.downloads == ["hello.py"]
