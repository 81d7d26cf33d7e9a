"""The tiers: the compressed pool, the file tiers (format, ownership, memory), the store over them."""
