"""Integrations of lasp with third-party model libraries.

* ``lasp.integrations.hf``: HuggingFace transformers (``patch_minimax`` / ``unpatch_minimax``).

Each integration imports its library only when used, so ``import lasp.integrations`` works without it.
"""

__all__ = ["hf"]
