"""Model output is untrusted text: make it safe to show in a terminal, literally."""

from __future__ import annotations

# C0 controls (but tab and newline) and DEL become their visible Unicode "control
# pictures" (ESC -> U+241B); C1 controls, which some terminals also obey, become U+FFFD.
_TABLE = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)}
_TABLE[0x7F] = 0x2421
_TABLE.update({c: 0xFFFD for c in range(0x80, 0xA0)})


def neutralize(text: str) -> str:
    """``text`` with every terminal control character replaced by a visible stand-in."""
    return text.translate(_TABLE)
