"""Buttons under a reply: Stop while it is written, Regenerate and Continue once it is stored (and the tools'
buttons of `adapters.discord.tool_buttons`: Run / Deny, Tool details).

They are discord.py dynamic items: the custom_id holds what a press needs (the reply's id), and the client
registers the classes (`DiscordBot.__init__`), so buttons sent before a restart keep working after it. Each
press first passes the bot's access lists; a press on a reply that is no longer the latest gets an ephemeral
explanation. The answer to Regenerate or Continue streams as a new message replying to the pressed one,
whose buttons go at once (only the newest answer carries them).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import discord

from adapters.discord.interactions import bot_of
from adapters.discord.tool_buttons import TOOL_BUTTONS, ApprovalButton, ToolDetailsButton
from bot.access import Action
from bot.conversations import RedoRefusal
from bot.types import Controls
from bot.wording import NOTHING_TO_CONTINUE, STALE_REPLY

__all__ = ["BUTTONS", "RedoButton", "StopButton", "view_for"]

log = logging.getLogger(__name__)

NO_MENTIONS = discord.AllowedMentions.none()
NOTHING_RUNNING = "Nothing is being generated in this conversation."
BEING_WRITTEN = "That answer is being written right now; wait for it to finish."
REFUSALS = {
    RedoRefusal.STALE: STALE_REPLY,
    RedoRefusal.BUSY: BEING_WRITTEN,
    RedoRefusal.NOTHING_TO_CONTINUE: NOTHING_TO_CONTINUE,
}


def view_for(controls: Controls | None) -> discord.ui.View | None:
    """The buttons that show ``controls``; None when there are none."""
    if controls is None:
        return None
    items: list[discord.ui.Item[Any]] = []
    if controls.approval is not None:
        items += [ApprovalButton(controls.approval, "run"), ApprovalButton(controls.approval, "deny")]
    if controls.stop:
        items.append(StopButton())
    if controls.reply_id is not None:
        items.append(RedoButton("regenerate", controls.reply_id))
        if controls.can_continue:
            items.append(RedoButton("continue", controls.reply_id))
        if controls.tool_details:
            items.append(ToolDetailsButton(controls.reply_id))
    if not items:
        return None
    view = discord.ui.View(timeout=None)  # a timeout would unregister the dynamic items when it fired
    for item in items:
        view.add_item(item)
    return view


async def _tell(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)


async def _allowed(interaction: discord.Interaction) -> bool:
    """The bot's access lists, for a press: True, or False after telling the presser why not."""
    bot = bot_of(interaction)
    key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
    why = await bot.refusal(interaction.user, key)
    if why is not None:
        await _tell(interaction, why)
    return why is None


class StopButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"llamarelay:stop"):
    """Stop: ends the reply being written in this conversation (as /stop does)."""

    def __init__(self) -> None:
        super().__init__(
            discord.ui.Button(label="Stop", emoji="⏹️", style=discord.ButtonStyle.secondary, custom_id="llamarelay:stop")
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> StopButton:
        return cls()

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await _allowed(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
        if bot.manager.stop(key):
            await interaction.response.defer()  # the reply itself shows that it stopped
        else:
            await _tell(interaction, NOTHING_RUNNING)


class RedoButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"llamarelay:(?P<action>regenerate|continue):(?P<reply_id>\d+)",
):
    """Regenerate (answer the last message again; the new answer replaces this one in the history) or Continue
    (the model goes on with an answer cut by the length limit, or stopped, where it ended)."""

    LOOKS = {
        "regenerate": ("Regenerate", "🔄", discord.ButtonStyle.secondary),
        "continue": ("Continue", "➡️", discord.ButtonStyle.primary),
    }

    def __init__(self, action: str, reply_id: int) -> None:
        self.action, self.reply_id = action, reply_id
        label, emoji, style = self.LOOKS[action]
        super().__init__(
            discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"llamarelay:{action}:{reply_id}")
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> RedoButton:
        return cls(match["action"], int(match["reply_id"]))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return await _allowed(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        await _redo(interaction, self.reply_id, continuing=self.action == "continue")


BUTTONS = (StopButton, RedoButton, *TOOL_BUTTONS)


async def _redo(interaction: discord.Interaction, reply_id: int, *, continuing: bool) -> None:
    """Regenerate or continue ``reply_id`` if it is still the conversation's latest answer."""
    bot = bot_of(interaction)
    key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
    if (refusal := await bot.manager.redo_refusal(key, reply_id, continuing=continuing)) is not None:
        await _tell(interaction, REFUSALS[refusal])
        return
    if (too_fast := await bot.refusal(interaction.user, key, Action.ASK)) is not None:
        await _tell(interaction, too_fast)  # a new answer costs what a message costs
        return
    # Answers within Discord's 3 s and takes this answer's buttons away: the new answer carries them.
    await interaction.response.edit_message(view=None)
    # A button's channel is typed as any channel or None; a message with buttons is in a messageable one.
    target = bot.channel_target(interaction.channel, trigger=interaction.message)  # type: ignore[arg-type]
    manager = bot.manager
    reply = (manager.continue_reply if continuing else manager.regenerate)(key, target, reply_id)
    await bot.answer(reply, key, typing_in=interaction.channel)  # type: ignore[arg-type]  # as above
