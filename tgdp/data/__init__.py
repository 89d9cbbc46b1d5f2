"""Data: the shard format, audio features, clip extraction, and the streaming loader."""
