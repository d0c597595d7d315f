"""Buttons for tools under a reply: Run / Deny for a call waiting for approval, and Tool details once a stored
reply has called tools.

Dynamic items, as the other reply buttons (`adapters.discord.controls`): the custom_id holds the approval's id or
the reply's id. Who may press Run / Deny is the core's access policy's question (`Action.APPROVE_TOOL`); the
waiting itself is the core's (`bot.tools.approvals`). Tool details answer only the presser, ephemerally.
"""

from __future__ import annotations

import re
from typing import Any

import discord

from adapters.discord.interactions import bot_of
from bot.access import Action
from bot.wording import APPROVAL_GONE, APPROVED, DENIED

__all__ = ["ApprovalButton", "ToolDetailsButton", "TOOL_BUTTONS"]

NO_MENTIONS = discord.AllowedMentions.none()
EPHEMERAL_LIMIT = 2000  # characters of one message


async def _tell(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text[:EPHEMERAL_LIMIT], ephemeral=True, allowed_mentions=NO_MENTIONS)


class ApprovalButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"llamarelay:approve:(?P<approval>[0-9a-f]+):(?P<choice>run|deny)",
):
    """Run or Deny a tool call that waits for approval."""

    LOOKS = {"run": ("Run", "▶️", discord.ButtonStyle.success), "deny": ("Deny", "🚫", discord.ButtonStyle.danger)}

    def __init__(self, approval: str, choice: str) -> None:
        self.approval, self.choice = approval, choice
        label, emoji, style = self.LOOKS[choice]
        super().__init__(
            discord.ui.Button(
                label=label, emoji=emoji, style=style, custom_id=f"llamarelay:approve:{approval}:{choice}"
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ApprovalButton:
        return cls(match["approval"], match["choice"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        approvals = bot.manager.approvals
        pending = approvals.get(self.approval)
        key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
        if pending is None or pending.key != str(key):
            await _tell(interaction, APPROVAL_GONE)
            return
        manages = bool(getattr(getattr(interaction.user, "guild_permissions", None), "manage_guild", False))
        if (
            why := await bot.refusal(
                interaction.user, key, Action.APPROVE_TOOL, manages_place=manages, owner=pending.owner
            )
        ) is not None:
            await _tell(interaction, why)
            return
        if not approvals.answer(self.approval, run=self.choice == "run"):
            await _tell(interaction, APPROVAL_GONE)
            return
        await _tell(interaction, APPROVED if self.choice == "run" else DENIED)


class ToolDetailsButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"llamarelay:tools:(?P<reply_id>\d+)"):
    """Tool details: the reply's tool calls, arguments and results, in an ephemeral message to the presser."""

    def __init__(self, reply_id: int) -> None:
        self.reply_id = reply_id
        super().__init__(
            discord.ui.Button(
                label="Tool details",
                emoji="🔧",
                style=discord.ButtonStyle.secondary,
                custom_id=f"llamarelay:tools:{reply_id}",
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> ToolDetailsButton:
        return cls(int(match["reply_id"]))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        bot = bot_of(interaction)
        key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
        if (why := await bot.refusal(interaction.user, key)) is not None:
            await _tell(interaction, why)
            return False
        return True

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        key = bot.session_for(interaction.channel, interaction.user, interaction.guild_id)
        await _tell(interaction, await bot.manager.tool_details(key, self.reply_id, EPHEMERAL_LIMIT))


TOOL_BUTTONS = (ApprovalButton, ToolDetailsButton)
