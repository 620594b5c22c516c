"""The mlxkv Textual chat app (installed as ``mlxkv_app``): ``mlxkv chat`` runs it."""

from .app import ChatApp

__all__ = ["ChatApp"]
