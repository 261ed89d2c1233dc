"""One exception family for everything Tilescope reports to a user.

Every message names the file (or model, or store) involved and says what to do about it.
"""

from __future__ import annotations

from os import PathLike

#: Core messages offer replacing an existing output with these words; each front end puts its
#: own control in their place (`reword`): ``--overwrite`` on the command line, the widget's
#: *overwrite* box in napari.
OVERWRITE_WORDS = "overwrite it"


def reword(message: str, overwrite: str) -> str:
    """`message` with `OVERWRITE_WORDS` replaced, e.g. by ``"pass --overwrite to replace it"``."""
    return message.replace(OVERWRITE_WORDS, overwrite)


class TilescopeError(Exception):
    """Base class of every error Tilescope raises on purpose."""


# -- slides -----------------------------------------------------------------------------------
class SlideError(TilescopeError):
    """A slide file could not be opened or read."""

    def __init__(self, path: str | PathLike[str] | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}")


class SlideNotFoundError(SlideError):
    """The path does not exist or is not a file."""


class UnsupportedFormatError(SlideError):
    """The file exists but OpenSlide cannot read it (not a slide, empty, corrupt, or unknown)."""


class RegionReadError(SlideError):
    """A region of an otherwise readable slide failed to decode."""


class ReaderError(SlideError):
    """A tile reader process died or failed; the tiles it was reading are not read."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class MissingMppError(SlideError):
    """A step needs physical pixel size but the slide has none and no override was given."""


# -- geometry -----------------------------------------------------------------------------------
class GridError(TilescopeError):
    """Invalid tiling parameters."""


class NoTilesError(GridError):
    """A slide has no tile to embed with the given settings (no tissue, or a tile too large)."""


# -- models -------------------------------------------------------------------------------------
class ModelError(TilescopeError):
    """A model could not be loaded or used."""


class WeightsNotFoundError(ModelError):
    """The model's weights are not reachable (no network, not cached, no local folder)."""


# -- stores -------------------------------------------------------------------------------------
class StoreError(TilescopeError):
    """An embedding store could not be created, opened or read."""


class StoreMismatchError(StoreError):
    """An existing store was made with other parameters; the message lists the differences.

    ``differences`` holds them one per line; ``can_overwrite`` is False when replacing the
    store is refused even on request (it holds another slide).
    """

    def __init__(
        self, message: str, *, differences: list[str] | None = None, can_overwrite: bool = True
    ) -> None:
        super().__init__(message)
        self.differences = list(differences or [])
        self.can_overwrite = can_overwrite


class StoreCorruptError(StoreError):
    """A store's layout, attributes or array data are damaged.

    ``array`` names the damaged array (or ``None`` for the group's metadata).
    """

    def __init__(self, message: str, *, array: str | None = None) -> None:
        super().__init__(message)
        self.array = array


class OutputExistsError(StoreError):
    """An output (an export) exists and may be replaced only on request."""


class StoreNotice(UserWarning):
    """Something a user should know about a store being resumed (a backend or precision that
    differs from the one that made it, damaged rows that are embedded again); not an error."""


class StoreBusyError(StoreError):
    """Another writer holds the store's lock."""


class StoreReplacedError(StoreError):
    """The store was replaced (``embed --overwrite``) while it was being read: open it again."""


# -- scoring and search -------------------------------------------------------------------------
class PromptError(TilescopeError):
    """A prompt set is empty or malformed."""


class SearchError(TilescopeError):
    """A region query cannot be answered (no tissue, no embedded tiles, incompatible stores)."""


class IndexBusyError(SearchError):
    """Another run is updating a cohort index."""


class IndexCorruptError(SearchError):
    """A cohort index is damaged or not in a layout this version reads; rebuild it."""


class SearchCancelled(SearchError):
    """The user stopped a search while its folder's index was being brought up to date; the
    index keeps the stores written so far, and the next search goes on from there."""
