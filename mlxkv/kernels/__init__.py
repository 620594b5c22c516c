"""Pure-MLX references and Metal dispatchers for mlxkv kernels."""
