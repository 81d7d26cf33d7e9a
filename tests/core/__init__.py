"""Store tests without FUSE: config, codec, pool, store."""
