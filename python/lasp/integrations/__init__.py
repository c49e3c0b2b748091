"""Integrations of lasp with third-party model libraries.

* ``lasp.integrations.hf``: HuggingFace transformers: ``patch`` / ``unpatch`` for every supported family
  (MiniMax here; the Gated DeltaNet families in ``hf_delta``, the Mamba-2 families in ``hf_mamba2``).

Each integration imports its library only when used, so ``import lasp.integrations`` works without it.
"""

__all__ = ["hf"]
