"""Platform adapters: each turns its platform's events into `bot.types.Incoming` and a `ReplyTarget`."""
