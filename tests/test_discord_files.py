"""Files sent with a mention or a DM: real discord.py against tests/fake_discord/ (which serves the attachments
over HTTP), with the real engine. Text-like files within ``[conversation] max_file_bytes`` are read into the
message under their names; binary or oversized ones are never downloaded and get a line saying so.
"""

from __future__ import annotations

from bot.config import Settings
from bot.conversations import ConversationManager
from tests.fake_discord import FakeDiscord
from tests.test_discord import ALICE_DM_KEY, CHANNEL_KEY, StartBot, dsettings, fake, force_reply, start_bot, stored  # noqa: F401

NOTES = "line one\nline two ```with a fence```\n"


async def test_text_files_are_read_and_the_others_skipped_unread(
    fake: FakeDiscord, manager: ConversationManager, dsettings: Settings, start_bot: StartBot
) -> None:
    dsettings.conversation.max_file_bytes = 1000
    await force_reply(manager, CHANNEL_KEY, "Read it.")
    await start_bot()
    mid = await fake.message_create(
        "what is in these?",
        files=[
            ("notes.txt", NOTES.encode(), "text/plain; charset=utf-8"),
            ("script.py", b"print('hi')\r\n", None),  # no content type: known by its suffix
            ("archive.zip", b"PK\x03\x04" + bytes(64), "application/zip"),
            ("big.log", b"x" * 5000, "text/plain"),
        ],
    )
    [notes_id, script_id, archive_id, big_id] = [int(a["id"]) for a in fake.messages[mid]["attachments"]]
    expected = "Read it.\n\n📎 I skipped archive.zip: not a text file.\n📎 I skipped big.log: larger than 1 kB."
    await fake.final_reply(mid, expected)
    assert sorted(fake.downloads) == sorted([notes_id, script_id])  # the others were judged by size and kind
    [question, answer] = await stored(manager, CHANNEL_KEY)
    assert question.content == (
        "what is in these?\n\nFile notes.txt:\n````\nline one\nline two ```with a fence```"
        "\n````\n\nFile script.py:\n```\nprint('hi')\n```"
    )
    assert answer.content == "Read it."


async def test_a_dm_with_only_a_file_is_answered(
    fake: FakeDiscord, manager: ConversationManager, start_bot: StartBot
) -> None:
    await force_reply(manager, ALICE_DM_KEY, "A list.")
    await start_bot()
    mid = await fake.message_create("", dm=True, mention_bot=False, files=[("todo.md", b"- milk\n- eggs", None)])
    await fake.final_reply(mid, "A list.")
    [question, _] = await stored(manager, ALICE_DM_KEY)
    assert question.content == "File todo.md:\n```\n- milk\n- eggs\n```" and question.author_name == "Alice"
