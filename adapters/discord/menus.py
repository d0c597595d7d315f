"""Message commands (a message's menu → Apps): "Ask llamarelay" and "Summarize".

Ask opens a modal for the question; the message (and its text files) is quoted above it
(`bot.context.ask_about`). Summarize reads the channel's or thread's messages up to the chosen one with
`channel.history` (at most ``[conversation] summarize_messages``, the newest within ``summarize_chars``) and
asks for a summary (`bot.context.summarize`). Both are answered in that channel's conversation, streamed
into the command's response. The command tree has checked access before either runs.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands

from adapters.discord.files import read_files
from adapters.discord.interactions import bot_of, role_ids
from adapters.discord.targets import NO_MENTIONS, InteractionTarget
from bot.access import Action
from bot.context import ask_about, summarize
from bot.types import Attachment, ImagePart, Incoming

__all__ = ["ASK_NAME", "SUMMARIZE_NAME", "AskModal", "ask_about_message", "summarize_until"]

log = logging.getLogger(__name__)

ASK_NAME = "Ask llamarelay"
SUMMARIZE_NAME = "Summarize"
QUESTION_MAX_CHARS = 4000  # Discord's limit for a text input
MODAL_TIMEOUT_SECONDS = 30 * 60.0  # a modal closed without submitting is forgotten after this
NO_HISTORY = "⚠️ I can't read this channel's messages: the bot needs **Read Message History** here."
NOTHING_TO_SUMMARIZE = "There is nothing to summarize here."


@app_commands.context_menu(name=ASK_NAME)
async def ask_about_message(interaction: discord.Interaction, message: discord.Message) -> None:
    """Ask about a message: a modal asks for the question."""
    await interaction.response.send_modal(AskModal(message))


class AskModal(discord.ui.Modal, title="Ask llamarelay about this message"):
    """The question about ``message``; submitting it asks the model in this channel's conversation."""

    question: discord.ui.Label[AskModal] = discord.ui.Label(
        text="Your question",
        component=discord.ui.TextInput(
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=QUESTION_MAX_CHARS,
            placeholder="What does this mean? (empty: what do you make of it)",
        ),
    )

    def __init__(self, message: discord.Message) -> None:
        super().__init__(timeout=MODAL_TIMEOUT_SECONDS)
        self.message = message

    async def on_submit(self, interaction: discord.Interaction, /) -> None:
        bot = bot_of(interaction)
        if await _too_fast(interaction):
            return
        await interaction.response.defer(thinking=True)
        assert isinstance(self.question.component, discord.ui.TextInput)
        text = ask_about(self.message.author.display_name, bot.prompt_text(self.message), self.question.component.value)
        files, images = await read_files(
            self.message.attachments, bot.manager.limits.max_file_bytes, bot.manager.images
        )
        await _answer(interaction, text, files, images)

    # discord.py's own Modal.on_error drops BaseView's ``item`` argument; this matches Modal's, which is called.
    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:  # type: ignore[override]
        log.error("the Ask modal failed", exc_info=error)


@app_commands.context_menu(name=SUMMARIZE_NAME)
async def summarize_until(interaction: discord.Interaction, message: discord.Message) -> None:
    """Summarize the channel's (or thread's) last messages, up to this one."""
    bot = bot_of(interaction)
    if await _too_fast(interaction):
        return
    await interaction.response.defer(thinking=True)
    conversation = bot.manager.limits
    channel = interaction.channel
    assert isinstance(channel, discord.abc.Messageable)
    said: list[tuple[str, str]] = []
    try:
        # Newest first; `before` is exclusive, so one past the chosen message includes it.
        async for earlier in channel.history(
            limit=conversation.summarize_messages, before=discord.Object(message.id + 1)
        ):
            if text := bot.prompt_text(earlier):
                said.append((earlier.author.display_name, text))
    except discord.HTTPException as exc:
        log.warning("could not read the history of channel %s: %s", message.channel.id, exc)
        await interaction.edit_original_response(content=NO_HISTORY, allowed_mentions=NO_MENTIONS)
        return
    if not said:
        await interaction.edit_original_response(content=NOTHING_TO_SUMMARIZE, allowed_mentions=NO_MENTIONS)
        return
    await _answer(interaction, summarize(said[::-1], conversation.summarize_chars))


async def _too_fast(interaction: discord.Interaction) -> bool:
    """Count the request as a message (the tree has checked the lists); True after telling the user to wait."""
    bot = bot_of(interaction)
    key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
    if (too_fast := await bot.refusal(interaction.user, key, Action.ASK)) is None:
        return False
    await interaction.response.send_message(too_fast, ephemeral=True, allowed_mentions=NO_MENTIONS)
    return True


async def _answer(
    interaction: discord.Interaction, text: str, files: tuple[Attachment, ...] = (), images: tuple[ImagePart, ...] = ()
) -> None:
    """Ask the model ``text`` as the user of ``interaction``, in this channel's conversation."""
    bot = bot_of(interaction)
    user = interaction.user
    key = bot.session_for(interaction.channel, user, interaction.guild_id)
    incoming = Incoming(
        key,
        str(user.id),
        user.display_name,
        text,
        event_id=str(interaction.id),
        attachments=files,
        images=images,
        author_roles=role_ids(user),
    )
    target = InteractionTarget(interaction, min_edit_interval=bot.settings.edit_interval)
    await bot.answer(bot.manager.respond(incoming, target), key)
