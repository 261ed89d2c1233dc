"""Model fixtures: the tiny untrained model, BiomedCLIP-layout snapshots and a fake HF cache.

Everything is built offline in temporary folders. The snapshots hold the tiny architecture's
weights (seed 0, the same weights as ``tiny-random``) in the file layout of the real hub
repository ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, so loading them must
give exactly the ``tiny-random`` embeddings. Register with ``pytest_plugins = ["model_fixtures"]``.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tilescope import _tiny_model
from tilescope.models import DEFAULT_MODEL, Encoder, load_encoder

BIOMEDCLIP_REPO = DEFAULT_MODEL.removeprefix("hf-hub:")
BERT_REPO = _tiny_model.BIOMEDBERT
#: What BiomedCLIP's model card leaves in the cache: its config and weights, and BiomedBERT's
#: config (read by AutoConfig) and tokenizer (read by AutoTokenizer via hf_tokenizer_name).
MODEL_CARD_FILES = {
    BIOMEDCLIP_REPO: ("open_clip_config.json", "open_clip_pytorch_model.bin"),
    BERT_REPO: ("config.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"),
}


def hub_cache_add(hub: Path, repo: str, source: Path, names: tuple[str, ...]) -> Path:
    """Put `names` from `source` into a hub cache laid out as huggingface_hub writes it.

    ``models--org--name/blobs/<sha256>``, ``snapshots/<commit>/<name>`` (relative symlinks to
    the blobs) and ``refs/main`` holding the commit. Returns the snapshot folder.
    """
    root = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name in names:
        data = (source / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if not link.exists():
            os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


@pytest.fixture(scope="session", autouse=True)
def tilescope_caches_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hash and OpenVINO caches in a temporary folder, never the user's ~/.cache."""
    from tilescope import _hash_cache, _openvino

    root = tmp_path_factory.mktemp("tilescope-cache")
    old = {k: os.environ.get(k) for k in (_hash_cache.CACHE_ENV, _openvino.CACHE_ENV)}
    os.environ[_hash_cache.CACHE_ENV] = str(root)
    os.environ[_openvino.CACHE_ENV] = str(root / "openvino")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_encoder() -> Encoder:
    """The ``tiny-random`` encoder on CPU in eager torch fp32 (untrained, deterministic): the
    reference other backends and open_clip itself are compared with. Named, not ``auto``: on a
    CPU with native bf16, ``auto`` is OpenVINO bf16."""
    return load_encoder("tiny-random", device="cpu", backend="torch")


@pytest.fixture(scope="session")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders with the files of the two hub repos (tiny sizes, BiomedCLIP's layout)."""
    root = tmp_path_factory.mktemp("repos")
    clip = _tiny_model.write_snapshot(root / "biomedclip")
    bert = _tiny_model.write_text_files(root / "biomedbert")
    return {BIOMEDCLIP_REPO: clip, BERT_REPO: bert}


@pytest.fixture
def snapshot_dir(repo_files: dict[str, Path], tmp_path: Path) -> Path:
    """A self-contained folder as the README describes: the BiomedCLIP files + ``text/``."""
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    for src in repo_files[BIOMEDCLIP_REPO].iterdir():
        os.symlink(src, folder / src.name)
    os.symlink(repo_files[BERT_REPO], folder / "text")
    return folder


@pytest.fixture
def offline_hub(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repo_files: dict[str, Path]
) -> Callable[..., Path]:
    """Point HF_HOME / HF_HUB_CACHE at an empty cache in tmp and go offline.

    Returns ``fill(files=None)``: adds ``{repo: names}`` (default `MODEL_CARD_FILES`) from
    `repo_files` to the cache, in the hub cache layout, and returns the hub cache folder.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def fill(files: dict[str, tuple[str, ...]] | None = None) -> Path:
        for repo, names in (MODEL_CARD_FILES if files is None else files).items():
            hub_cache_add(hub, repo, repo_files[repo], names)
        return hub

    return fill


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Fail the test if anything opens a network connection (they are refused and recorded)."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access attempted in a test: {address}")
        real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert not attempts, f"the test tried to reach the network: {attempts}"
