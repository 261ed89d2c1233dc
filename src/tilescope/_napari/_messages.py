"""What the widgets say, and where.

- A `StatusLabel` holds one status line per widget: it wraps, never asks for more width than
  its dock has (so a long error never grows the window or squeezes the canvas), shows at most
  `MAX_STATUS_CHARS` characters, and keeps the whole message in its tooltip and ``value``.
- Long messages and every error also go to napari's notifications (`report_error`,
  `report_status`), where they can be read in full.
- Errors are worded for the widget (`gui_message`): the core's messages name CLI flags
  (``--slide-mpp``, ``--overwrite``, ``--model tiny-random``); in napari they name the widget's
  own fields instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from magicgui.widgets import Label

#: The most characters a status line shows (the rest is in its tooltip and the notification).
MAX_STATUS_CHARS = 180
#: Tokens longer than this get break opportunities (zero-width spaces) after / _ - . so that a
#: path wraps instead of widening the dock.
_LONG_TOKEN = 24
_ZWSP = "\u200b"

#: CLI flags a core message may name -> the widget field that does the same, as a last resort
#: when no rule of `gui_message` rewords the message.
FLAG_WORDS: dict[str, str] = {
    "--slide-mpp": "'slide µm/px'",
    "--overwrite": "the 'overwrite' box",
    "--model": "'model'",
    "--min-tissue": "the minimum tissue fraction",
    "--mpp": "'µm / px'",
    "--tile": "'tile px'",
    "--overlap": "'overlap px'",
    "--retry-failed": "embedding again",
    "--scores": "the score set",
}
WEIGHTS_HELP = (
    "In 'model', type the path of a folder that holds the weights (see the README, 'Using "
    "BiomedCLIP offline'), or tiny-random to try Tilescope with a small untrained model "
    "(its results mean nothing)."
)
MPP_HELP = (
    "Type the slide's pixel size in 'slide µm/px' (e.g. 0.25 for a 40x scan, 0.5 for 20x), "
    "then press Embed again."
)


def breakable(text: str) -> str:
    """`text` with zero-width spaces after / _ - . inside long tokens (paths, hashes), so Qt's
    word wrap can break them."""

    def split(m: re.Match[str]) -> str:
        return re.sub(r"([/\\_.\-:])", r"\1" + _ZWSP, m.group(0))

    return re.sub(rf"\S{{{_LONG_TOKEN},}}", split, text)


def shorten(text: str, limit: int = MAX_STATUS_CHARS) -> tuple[str, bool]:
    """The first line of `text`, cut to `limit` characters; and whether anything was left out."""
    whole = str(text).strip()
    first = whole.splitlines()[0] if whole else ""
    cut = first != whole
    if len(first) > limit:
        first, cut = first[: limit - 1].rstrip() + "…", True
    return first, cut


class StatusLabel(Label):
    """A status line that wraps and never widens its dock; ``value`` is the whole message,
    the label shows its first line (at most `MAX_STATUS_CHARS` characters), the tooltip all."""

    def __init__(self, **kwargs: Any) -> None:
        self._message = ""
        super().__init__(value="", **kwargs)
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QSizePolicy

        native = self.native
        native.setWordWrap(True)
        native.setTextFormat(Qt.TextFormat.PlainText)
        native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # the dock decides the width; the label takes the height its wrapped text needs
        native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
        native.setMinimumWidth(60)

    @property
    def value(self) -> str:
        return self._message

    @value.setter
    def value(self, text: Any) -> None:
        self._message = "" if text is None else str(text)
        shown, cut = shorten(self._message)
        self.native.setText(breakable(shown + (" (more in the tooltip)" if cut else "")))
        self.native.setToolTip(breakable(self._message) if cut else "")

    @property
    def displayed(self) -> str:
        """The text on screen (without break opportunities)."""
        return str(self.native.text()).replace(_ZWSP, "")


def wrapping(label: Any) -> Any:
    """A magicgui Label (rich text allowed) that wraps to its dock's width, never widening it."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)
    return label


def compact_combo(combo: Any, chars: int = 14) -> None:
    """Keep a magicgui ComboBox from widening its dock to fit its longest item."""
    from qtpy.QtWidgets import QComboBox

    native = combo.native
    native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    native.setMinimumContentsLength(chars)


def gui_message(exc: BaseException, overwrite: str | None = None) -> str:
    """An error's message worded for napari: the widget's fields, never CLI flags.

    `overwrite` names the widget's control that replaces an existing output (e.g. "tick
    'overwrite a store made with other settings'"), put where the core offers to overwrite.
    """
    from ..errors import (
        MissingMppError,
        TilescopeError,
        WeightsNotFoundError,
        reword,
    )

    if not isinstance(exc, TilescopeError):
        if isinstance(exc, OSError) and exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}"
        return f"{type(exc).__name__}: {exc}"
    text = str(exc)
    if isinstance(exc, WeightsNotFoundError):
        first = text.strip().splitlines()[0] if text.strip() else "model weights not found"
        return f"{first}\n{WEIGHTS_HELP}"
    if isinstance(exc, MissingMppError):
        name = Path(exc.path).name if exc.path else "the slide"
        reason = exc.reason.split(";")[0]
        return f"{name}: {reason}. {MPP_HELP}"
    if overwrite:
        text = reword(text, overwrite)
    text = text.replace("(save one with tilescope classify --train ... --write-classifier)",
                        "(train one here and press Write)")  # fmt: skip
    return replace_flags(text)


def replace_flags(text: str, words: Mapping[str, str] = FLAG_WORDS) -> str:
    """Every CLI flag named in `text` replaced by the widget field that does the same."""
    for flag in sorted(words, key=len, reverse=True):
        text = re.sub(rf"`?{re.escape(flag)}(?![\w-])(?: [A-Za-z0-9_./:-]+)?`?", words[flag],
                      text)  # fmt: skip
    return text


def report_error(status: StatusLabel, exc: BaseException, overwrite: str | None = None) -> str:
    """Show `exc` worded for the widget: the status line, and the whole as a notification."""
    message = gui_message(exc, overwrite)
    status.value = f"error: {message}"
    notify_error(message)
    return message


def report_status(status: StatusLabel, text: str) -> None:
    """Show `text` on the status line; a message too long for it goes to a notification too."""
    status.value = text
    if shorten(text)[1]:
        notify_info(text)


def notify_error(message: str) -> None:
    """An error as a napari notification with its reason (no traceback dialog)."""
    from napari.utils.notifications import show_error

    show_error(f"Tilescope: {message}")


def notify_info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(f"Tilescope: {message}")


def notify_warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(f"Tilescope: {message}")


def notify_action(message: str, actions: list[tuple[str, Any]], severity: str = "info") -> None:
    """A notification with buttons: ``(text, callback)``; a callback takes no argument."""
    from napari.utils.notifications import Notification, notification_manager

    wrapped = [(text, lambda _=None, cb=cb: cb()) for text, cb in actions]
    notification_manager.dispatch(Notification(f"Tilescope: {message}", severity, wrapped))
