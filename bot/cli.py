"""The `llamarelay` command's entry point: sets up how llama.cpp's threads wait, then loads the rest.

libgomp reads its spin setting once, when llama.cpp's library loads, and importing `bot.app` loads it: so this
module imports nothing of the bot before `configure_openmp` has run.
"""

from __future__ import annotations

from bot.engine.threads import configure_openmp

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    configure_openmp()
    from bot.app import main as run

    run(argv)
