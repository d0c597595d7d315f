"""Per-session settings (`bot.conversations.settings`): a thread inherits its channel's until it sets its own."""

from __future__ import annotations

from bot.conversations import ConversationManager
from bot.types import SessionKey
from tests.conversations.helpers import CHANNEL


async def test_a_thread_inherits_its_channels_settings_until_it_sets_its_own(manager: ConversationManager) -> None:
    thread = SessionKey.for_channel("test", "guild1", "chan1", "thread9")
    await manager.set_system_prompt(CHANNEL, "Channel rules.")
    await manager.set_sampling(CHANNEL, temperature=0.2)
    assert await manager.system_prompt(thread) == "Channel rules."
    assert (await manager.sampling(thread)).temperature == 0.2
    await manager.set_system_prompt(thread, "Thread rules.")
    await manager.set_sampling(thread, top_p=0.5)
    assert await manager.system_prompt(thread) == "Thread rules."
    assert (await manager.sampling(thread)).temperature == 0.2 and (await manager.sampling(thread)).top_p == 0.5
    assert (await manager.sampling(CHANNEL)).top_p == manager.settings.sampling.top_p
