"""Offline mode: no network access at all, whatever asks for it.

Tilescope is offline when ``TILESCOPE_OFFLINE`` or Hugging Face's ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is set to a true value (``1``, ``on``, ``yes``, ``true``), read from
the environment at the time of each call. Offline, the sample slide is never downloaded (the
demo and napari's *Open Sample* fall back to a synthetic slide) and model files come from the
local Hugging Face cache or a folder only.
"""

from __future__ import annotations

import os

ENV_VAR = "TILESCOPE_OFFLINE"
#: Checked in this order; the first one set to a true value is named in messages.
OFFLINE_VARS = (ENV_VAR, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "ON", "YES", "TRUE")


def offline_reason() -> str | None:
    """``"TILESCOPE_OFFLINE=1"`` (the variable that makes us offline, as set), or None online."""
    for var in OFFLINE_VARS:
        value = os.environ.get(var, "")
        if value.strip().upper() in _TRUE:
            return f"{var}={value.strip()}"
    return None


def is_offline() -> bool:
    """Whether network access is off (see `offline_reason`)."""
    return offline_reason() is not None
