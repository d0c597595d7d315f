"""Slack adapter: slack-bolt listeners for mentions, DMs and slash commands, streamed through the core.

`bot` holds the AsyncApp and its lifecycle, `commands` the slash commands, `targets` the ways a reply is
shown (chat.update or native streaming), `mrkdwn` the Markdown ↔ Slack text conversion.
"""

from adapters.slack.bot import SlackBot, run_slack

__all__ = ["SlackBot", "run_slack"]
