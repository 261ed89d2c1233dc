"""The encoder: open_clip equivalence, determinism, offline loading, clear errors, truncation.

All tests run offline on CPU with the tiny untrained model of BiomedCLIP's architecture family
(timm ViT + HF BERT), or with snapshots of it written in the real BiomedCLIP file layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from _paths import PATCHES, need

from tilescope import _model_files
from tilescope.errors import ModelError, TilescopeError, WeightsNotFoundError
from tilescope.models import DEFAULT_MODEL, TINY_MODEL, Encoder, load_encoder, pick_device

pytestmark = pytest.mark.usefixtures("no_network")

RNG = np.random.default_rng(7)
TILES = RNG.integers(0, 256, size=(6, 224, 224, 3), dtype=np.uint8)


def open_clip_reference(enc: Encoder, tiles: np.ndarray) -> np.ndarray:
    """open_clip's own path: ``preprocess(PIL image)`` then ``encode_image(normalize=True)``."""
    import torch
    from PIL import Image

    batch = torch.stack([enc.open_clip_preprocess(Image.fromarray(t)) for t in tiles])
    with torch.inference_mode():
        return enc.model.encode_image(batch, normalize=True).numpy()


def he_patches(n_per_class: int = 1) -> tuple[np.ndarray, list[str]]:
    """Real H&E patches (224 px), `n_per_class` of each CRC-VAL-HE-7K class."""
    from PIL import Image

    files = sorted(need(PATCHES).glob("*.png"))
    picked = [f for i, f in enumerate(files) if i % 4 < n_per_class]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked])
    return tiles, [f.name for f in picked]


def assert_same_embeddings(ours: np.ndarray, ref: np.ndarray, *, min_cos: float = 0.999) -> None:
    cos = ours @ ref.T
    assert np.diagonal(cos).min() >= min_cos
    # each tile is closest to its own reference, not merely close to everything
    assert (cos.argmax(axis=1) == np.arange(len(ours))).all()


# -- 1. equivalence with open_clip ------------------------------------------------------------
def test_224_tiles_match_open_clip_preprocess_and_encode(tiny_encoder):
    ours = tiny_encoder.encode_images(TILES)
    ref = open_clip_reference(tiny_encoder, TILES)
    assert_same_embeddings(ours, ref)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_real_he_patches_match_open_clip(tiny_encoder):
    tiles, names = he_patches()
    assert tiles.shape[1:] == (224, 224, 3), names
    ours = tiny_encoder.encode_images(tiles)
    ref = open_clip_reference(tiny_encoder, tiles)
    assert_same_embeddings(ours, ref)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("size", [(256, 256), (300, 260), (160, 200)])
def test_other_tile_sizes_resize_on_device_like_open_clip(tiny_encoder, size):
    from PIL import Image

    tiles, _ = he_patches()
    resized = np.stack([np.asarray(Image.fromarray(t).resize(size[::-1])) for t in tiles[:4]])
    ours = tiny_encoder.encode_images(resized)
    ref = open_clip_reference(tiny_encoder, resized)
    assert_same_embeddings(ours, ref, min_cos=0.999)


# -- 2. shapes, norms, dtype, determinism ----------------------------------------------------------
def test_shapes_norms_dtypes_and_labels(tiny_encoder):
    import torch

    enc = tiny_encoder
    emb = enc.encode_images(TILES)
    assert emb.shape == (6, enc.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode_images(torch.from_numpy(TILES)), emb)
    assert enc.encode_images(TILES[:0]).shape == (0, enc.embed_dim)
    text = enc.encode_text(["invasive carcinoma", "lymphocytes", "necrosis"])
    assert text.shape == (3, enc.embed_dim) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    assert enc.tokenize(["tumor"]).shape == (1, enc.context_length) == (1, 256)
    assert (enc.image_size, enc.device.type, enc.autocast_dtype) == (224, "cpu", None)
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert not enc.trained and "UNTRAINED" in enc.label and enc.model_id == TINY_MODEL
    prov = json.loads(json.dumps(enc.provenance()))
    assert prov["weights_digest"] == enc.weights_digest and prov["trained"] is False
    assert {"model_id", "embed_dim", "open_clip_version"} <= prov.keys()


def test_bad_tile_arrays_are_refused(tiny_encoder):
    for bad in (TILES.astype(np.float32), TILES[..., :2], TILES[0]):
        with pytest.raises(ModelError, match="uint8 RGB"):
            tiny_encoder.encode_images(bad)


def test_same_tile_same_embedding_and_two_builds_identical(tiny_encoder):
    first = tiny_encoder.encode_images(TILES[:2])
    np.testing.assert_array_equal(tiny_encoder.encode_images(TILES[:2]), first)
    other = load_encoder(TINY_MODEL, device="cpu", backend="torch")
    assert other.weights_digest == tiny_encoder.weights_digest
    np.testing.assert_array_equal(other.encode_images(TILES[:2]), first)
    # text: equal up to float rounding (a prompt's padding is cut to its batch's longest)
    np.testing.assert_allclose(
        other.encode_text(["stroma"]), tiny_encoder.encode_text(["stroma"]), atol=1e-6
    )


def test_tiny_model_is_identical_in_another_process(tiny_encoder):
    code = "from tilescope.models import load_encoder as L; print(L('tiny-random').weights_digest)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tiny_encoder.weights_digest


# -- 3. offline loading: local folder and prepared HF cache --------------------------------------
def check_snapshot_encoder(enc: Encoder, tiny: Encoder, weights: Path) -> None:
    """A loaded snapshot of the seed-0 tiny weights must behave exactly like tiny-random."""
    assert enc.trained and "UNTRAINED" not in enc.label
    assert enc.weights_digest == _model_files.sha256_file(weights)
    assert enc.context_length == 256 and enc.embed_dim == tiny.embed_dim
    assert enc.mean == tiny.mean and enc.std == tiny.std
    np.testing.assert_allclose(
        enc.encode_images(TILES[:3]), tiny.encode_images(TILES[:3]), atol=1e-6
    )
    prompts = ["invasive carcinoma", "normal colon mucosa"]
    np.testing.assert_allclose(enc.encode_text(prompts), tiny.encode_text(prompts), atol=1e-6)


@pytest.mark.parametrize("form", ["path", "local-dir"])
def test_loads_from_local_folder_offline(snapshot_dir, offline_hub, tiny_encoder, form):
    offline_hub({})  # HF cache empty, offline: everything must come from the folder
    name = str(snapshot_dir) if form == "path" else f"local-dir:{snapshot_dir}"
    enc = load_encoder(name, device="cpu", backend="torch")
    assert enc.model_id == f"local-dir:{snapshot_dir.resolve()}"
    check_snapshot_encoder(enc, tiny_encoder, snapshot_dir / "open_clip_pytorch_model.bin")


def test_folder_with_bert_config_beside_and_safetensors(
    tmp_path, repo_files, offline_hub, tiny_encoder
):
    from tilescope import _tiny_model

    offline_hub({})
    folder = _tiny_model.write_snapshot(tmp_path / "snap", weights="open_clip_model.safetensors")
    (folder / "config.json").write_bytes(
        (repo_files[_tiny_model.BIOMEDBERT] / "config.json").read_bytes()
    )
    enc = load_encoder(str(folder), device="cpu", backend="torch")
    check_snapshot_encoder(enc, tiny_encoder, folder / "open_clip_model.safetensors")


@pytest.mark.parametrize(
    "name", [DEFAULT_MODEL, "biomedclip", DEFAULT_MODEL.removeprefix("hf-hub:")]
)
def test_default_model_loads_from_prepared_hf_cache_offline(offline_hub, tiny_encoder, name):
    hub = offline_hub()  # what BiomedCLIP's model card leaves in the cache, nothing else
    enc = load_encoder(name, device="cpu", backend="torch")
    assert enc.model_id == DEFAULT_MODEL
    (weights,) = hub.glob("models--microsoft--BiomedCLIP*/snapshots/*/open_clip_pytorch_model.bin")
    check_snapshot_encoder(enc, tiny_encoder, weights)


def test_hf_cache_location_is_read_from_the_environment_at_call_time(offline_hub, monkeypatch):
    import huggingface_hub.constants as hf_constants

    offline_hub()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", "/nonexistent/hub")  # as set at import
    assert load_encoder(device="cpu", backend="torch").trained


def test_hf_cache_with_full_repo_but_no_bert_tokenizer(offline_hub, tiny_encoder):
    from model_fixtures import BERT_REPO, BIOMEDCLIP_REPO

    # `hf download <BiomedCLIP>` + `hf download <BiomedBERT> config.json`, as the README says
    full = ("open_clip_config.json", "open_clip_pytorch_model.bin", "tokenizer_config.json",
            "vocab.txt", "special_tokens_map.json")  # fmt: skip
    offline_hub({BIOMEDCLIP_REPO: full, BERT_REPO: ("config.json",)})
    enc = load_encoder(DEFAULT_MODEL, device="cpu", backend="torch")
    assert enc.trained
    prompts = ["lymphocytes"]
    np.testing.assert_allclose(
        enc.encode_text(prompts), tiny_encoder.encode_text(prompts), atol=1e-6
    )


# -- 4. bad inputs give one clear error ----------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(ModelError, match="Unknown model 'not-a-model'") as info:
        load_encoder("not-a-model", device="cpu", backend="torch")
    assert not isinstance(info.value, WeightsNotFoundError)
    assert "tiny-random" in str(info.value) and "local-dir:" in str(info.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_encoder("/no/such/folder", device="cpu", backend="torch")
    with pytest.raises(ModelError, match="tags for ViT-B-32: .*laion2b"):
        load_encoder("ViT-B-32", device="cpu", backend="torch")


def test_missing_default_weights_offline_is_one_clear_error(offline_hub):
    hub = offline_hub({})
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder(device="cpu", backend="torch")
    msg = str(info.value)
    assert DEFAULT_MODEL in msg and str(hub) in msg
    for way in ("connect to the internet", "HF_HUB_CACHE", "/path/to/folder", "tiny-random"):
        assert way in msg
    assert isinstance(info.value, TilescopeError)


def test_cached_config_without_weights(offline_hub):
    from model_fixtures import BERT_REPO, BIOMEDCLIP_REPO

    offline_hub({BIOMEDCLIP_REPO: ("open_clip_config.json",), BERT_REPO: ("config.json",)})
    with pytest.raises(WeightsNotFoundError, match="found but not the weights"):
        load_encoder(DEFAULT_MODEL, device="cpu", backend="torch")


def test_folder_without_weights_or_config(snapshot_dir, tmp_path, offline_hub):
    offline_hub({})
    (snapshot_dir / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(WeightsNotFoundError, match="no weights file") as info:
        load_encoder(str(snapshot_dir), device="cpu", backend="torch")
    assert str(snapshot_dir.resolve()) in str(info.value) and "tiny-random" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="has no open_clip_config.json"):
        load_encoder(str(empty), device="cpu", backend="torch")


def test_folder_without_text_encoder_config(snapshot_dir, offline_hub):
    offline_hub({})
    (snapshot_dir / "text").unlink()
    with pytest.raises(WeightsNotFoundError, match="config.json of its text encoder") as info:
        load_encoder(str(snapshot_dir), device="cpu", backend="torch")
    assert "hf download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json" in str(
        info.value
    )


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_would_run_code_is_refused(snapshot_dir, tmp_path, offline_hub):
    import torch

    offline_hub({})
    marker = tmp_path / "code-ran"
    weights = snapshot_dir / "open_clip_pytorch_model.bin"
    weights.unlink()  # a symlink into the shared session snapshot
    torch.save({"visual.x": torch.zeros(1), "payload": _RunsCode(marker)}, weights)
    with pytest.raises(ModelError, match="refusing to load"):
        load_encoder(str(snapshot_dir), device="cpu", backend="torch")
    assert not marker.exists()


def test_unavailable_device():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="not available"):
            pick_device("cuda")
    with pytest.raises(ModelError, match="Unknown device"):
        pick_device("gpu-please")
    assert pick_device("cpu").type == "cpu"


# -- 5. truncation ----------------------------------------------------------------------------
def test_long_prompt_warns_and_is_truncated(tiny_encoder):
    long_prompt = "tumour infiltrating lymphocytes " * 60
    with pytest.warns(UserWarning, match=r"Prompt 'tumour infiltrating.*has \d+ tokens.*first 256"):
        emb = tiny_encoder.encode_text([long_prompt])
    assert emb.shape == (1, tiny_encoder.embed_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_encoder.encode_text(["tumour infiltrating lymphocytes"])


def test_text_padding_trim_and_cache_do_not_change_embeddings(tiny_encoder) -> None:
    """Cutting the padding of the 256-token context (BERT masks it) gives the same vectors,
    and cached prompts come back unchanged; only new prompts reach the text tower."""
    import torch

    prompts = ["an H&E image of tumor", "a histopathology image of dense lymphocytic infiltrate"]
    tokens = tiny_encoder.tokenize(prompts)
    assert tokens.shape[1] == tiny_encoder.context_length
    with torch.inference_mode():
        full = tiny_encoder.model.encode_text(tokens, normalize=True).numpy()
    got = tiny_encoder.encode_text(prompts)
    np.testing.assert_allclose(got, full, atol=1e-5)
    seen = []
    real = tiny_encoder._encode_text_uncached

    def spy(batch):
        seen.append(list(batch))
        return real(batch)

    tiny_encoder._encode_text_uncached = spy
    try:
        again = tiny_encoder.encode_text([prompts[1], "an H&E image of necrosis", prompts[0]])
    finally:
        del tiny_encoder._encode_text_uncached
    assert seen == [["an H&E image of necrosis"]]
    np.testing.assert_array_equal(again[[2, 0]], got)
