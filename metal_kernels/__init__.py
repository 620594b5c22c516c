"""Metal kernel sources (``.metal``), shipped as package data (``mlxkv_metal``)."""
