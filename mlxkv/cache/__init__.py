"""mlxkv KV caches: one class per file, all behind mlx-lm's cache protocol."""
