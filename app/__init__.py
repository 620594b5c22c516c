"""The mlxkv Textual chat app (installed as ``mlxkv_app``)."""
