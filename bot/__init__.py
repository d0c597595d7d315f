"""llamarelay core: one llama.cpp engine, per-session conversations in SQLite, platform-free streaming."""

from bot.cpu import prefer_sleeping_threads

# Before anything loads llama.cpp: libgomp reads its wait policy once, when it is loaded (see bot/cpu.py).
prefer_sleeping_threads()
