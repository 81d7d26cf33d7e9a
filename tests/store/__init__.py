"""Store tests without FUSE: the state, slots, codec, cache, dedup, recompression, writeback and the store."""
