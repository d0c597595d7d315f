"""llamarelay core: one llama.cpp engine, per-session conversations in SQLite, platform-free streaming."""
