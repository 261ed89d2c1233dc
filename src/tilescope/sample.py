"""The sample slide: CMU-1-Small-Region.svs from the OpenSlide test data (CC0).

Looked up in this order: the file named by ``TILESCOPE_SAMPLE_SLIDE``; the user's cache
(``$XDG_CACHE_HOME/tilescope`` or ``~/.cache/tilescope``); else downloaded once from the public
OpenSlide test-data site into that cache with `pooch` (which checks the sha256 and writes the
file only once it is complete), unless Tilescope is offline (``TILESCOPE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``, see `tilescope.offline`): then nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import TilescopeError
from .offline import offline_reason

SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_URL = (
    "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs"
)
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
ENV_VAR = "TILESCOPE_SAMPLE_SLIDE"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tilescope"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample_slide_path(*, download: bool = True, timeout: float = 30.0) -> Path:
    """Path to the sample slide, downloading it once if needed.

    Raises
    ------
    TilescopeError
        If ``TILESCOPE_SAMPLE_SLIDE`` names a missing file, or the slide is not cached and
        downloads are off (offline mode, or ``download=False``) or the download fails.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise TilescopeError(f"{ENV_VAR}={env}: no such file; point it at {SAMPLE_NAME}")
        return path
    cached = cache_dir() / SAMPLE_NAME
    if cached.is_file() and sha256_file(cached) == SAMPLE_SHA256:
        return cached
    if not download:
        raise TilescopeError(f"the sample slide is not cached at {cached}")
    offline = offline_reason()
    if offline:
        raise TilescopeError(
            f"offline ({offline}): the sample slide is not downloaded. Copy {SAMPLE_NAME} to "
            f"{cached} or set {ENV_VAR} to its path"
        )
    import pooch

    try:
        got = pooch.retrieve(
            SAMPLE_URL,
            known_hash=f"sha256:{SAMPLE_SHA256}",
            fname=SAMPLE_NAME,
            path=cached.parent,
            progressbar=False,
            downloader=pooch.HTTPDownloader(timeout=timeout),
        )
    except ValueError as exc:  # pooch: the downloaded file's hash differs
        raise TilescopeError(
            f"downloaded {SAMPLE_URL} but it is not the expected file ({exc}); try again, or "
            f"download it yourself and set {ENV_VAR} to its path"
        ) from exc
    except Exception as exc:  # requests' connection errors, OSError: offline, no space, ...
        raise TilescopeError(
            f"could not download the sample slide from {SAMPLE_URL} ({exc}). Offline? Copy "
            f"{SAMPLE_NAME} to {cached} or set {ENV_VAR} to its path"
        ) from exc
    return Path(got)


SYNTHETIC_NAME = "synthetic-demo-slide.tif"


def synthetic_slide_path(folder: Path) -> Path:
    """A synthetic H&E-like slide (4096 x 3072 px at 0.5 µm/px, five tissue blobs) in `folder`,
    written once: what the demo and napari's *Open Sample* show when the sample cannot be had."""
    from .synthetic import SyntheticSlide

    target = folder / SYNTHETIC_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        SyntheticSlide.with_random_blobs(4096, 3072, mpp=0.5, n=5, seed=1).write(target)
    return target


def sample_or_synthetic(folder: Path | None = None) -> tuple[Path, str | None]:
    """(the sample slide, None), or (a synthetic slide in `folder` (default: the cache
    folder), why the sample could not be had) when it is not cached and offline or
    unreachable. The synthetic slide is named in the message."""
    try:
        return sample_slide_path(), None
    except TilescopeError as exc:
        target = synthetic_slide_path(folder or cache_dir())
        return target, f"{exc}.\nUsing a synthetic slide instead: {target}"
