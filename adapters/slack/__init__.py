"""Slack adapter: slack-bolt listeners for mentions, DMs, threads, slash commands, buttons, message shortcuts
and assistant threads, streamed through the core.

`bot` holds the AsyncApp, its lifecycle and the message listeners; `commands` the slash commands; `controls`
the buttons under replies and `blocks` how they are drawn; `shortcuts` the message shortcuts; `assistant` the
AI-app surface; `files` reads shared files; `targets` the ways a reply is shown (chat.update, native
streaming, an assistant thread); `mrkdwn` the Markdown ↔ Slack text conversion.
"""

from adapters.slack.bot import SlackBot, run_slack

__all__ = ["SlackBot", "run_slack"]
