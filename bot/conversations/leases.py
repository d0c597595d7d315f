"""Reply leases: every reply in progress is leased and renewed; a process takes over the replies of one that
died (a lease no one renews), marking them interrupted and rewriting their messages without a Stop button."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable

from bot.config import StoreSettings
from bot.conversations.requests import Locator
from bot.delivery import display_text
from bot.errors import LlamarelayError
from bot.metrics import Metrics
from bot.replies import split_reply
from bot.store import LapsedReply, Store
from bot.types import Controls, SessionKey, log_name
from bot.wording import TAKEN_OVER_NOTE

__all__ = ["Leases"]

log = logging.getLogger(__name__)


class Leases:
    """Keeps this process's reply leases and takes over lapsed ones, once `start` is called."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        locators: dict[str, Locator],
        *,
        settings: StoreSettings,
        ours: Callable[[], Iterable[int]],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._locators = locators  # per platform, how to reach a reply's message again
        self._settings = settings  # its reply_lease: seconds a lease lasts
        self._ours = ours  # the reply rows this process is writing now
        self._keeper: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def seconds(self) -> float | None:
        """How long a new reply's lease lasts; None (no lease) until `start`."""
        return self._settings.reply_lease if self._keeper is not None else None

    def start(self) -> None:
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name="reply leases")

    async def stop(self) -> None:
        tasks = [task for task in (self._keeper, *self._retiring) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keeper = None

    async def _keep(self) -> None:
        """Three times a lease: renew this process's replies, then take over those whose lease ran out."""
        lease = self._settings.reply_lease
        while True:
            try:
                if ours := list(self._ours()):
                    await self._store.renew_leases(ours, lease)
                for lapsed in await self._store.expire_leases(TAKEN_OVER_NOTE):
                    log.warning(
                        "reply %d in %s was left generating by a process that stopped; marked interrupted",
                        lapsed.id,
                        log_name(lapsed.session_key),
                    )
                    task = asyncio.create_task(self._retire(lapsed), name="retire a reply")
                    self._retiring.add(task)
                    task.add_done_callback(self._retiring.discard)
            except LlamarelayError as exc:  # the database is away: try again next time
                log.warning("could not renew or check reply leases: %s", exc)
            except Exception:  # never stop renewing: other processes would take over our live replies
                log.exception("keeping reply leases failed")
            await asyncio.sleep(lease / 3)

    async def _retire(self, lapsed: LapsedReply) -> None:
        """Show a reply taken over from a dead process as it was saved, with the note and without Stop."""
        key = SessionKey.parse(lapsed.session_key)
        locate = self._locators.get(key.platform)
        if locate is None or not lapsed.message_ref:
            return
        try:
            where = json.loads(lapsed.message_ref)
            target, handle = locate(key, where["at"])
            measure: Callable[[str], int] = getattr(target, "measure", len)
            pieces = split_reply(lapsed.content[where["skip"] :], target.max_length, measure)
            piece = pieces[where["message"]].text if where["message"] < len(pieces) else ""
            while piece and (over := measure(display_text(piece, TAKEN_OVER_NOTE)) - target.max_length) > 0:
                piece = piece[:-over]
            await target.edit(
                handle,
                display_text(piece, TAKEN_OVER_NOTE),
                Controls(reply_id=lapsed.id, can_continue=bool(lapsed.content.strip())),
            )
        except Exception as exc:  # the message may be gone; the stored reply is what matters
            self._metrics.platform_failure(key.platform, exc)
            log.warning("could not rewrite the message of reply %d in %s: %s", lapsed.id, log_name(key), exc)
