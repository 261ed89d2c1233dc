"""Offline mode (TILESCOPE_OFFLINE=1 or HF_HUB_OFFLINE=1): no network access at all.

The sample slide is not downloaded (the demo and napari's Open Sample show a synthetic slide and
say why), and models come from the local caches only, with a message naming how to supply them.
`no_network` records (and refuses) every connection attempt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tilescope.errors import WeightsNotFoundError

OFFLINE_VARS = ("TILESCOPE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


@pytest.fixture
def no_sample(monkeypatch, tmp_path):
    """No sample slide anywhere (empty cache, no TILESCOPE_SAMPLE_SLIDE), online by default,
    and `pooch.retrieve` recorded (a download attempt) instead of run."""
    import huggingface_hub.constants as hf_constants
    import pooch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("TILESCOPE_SAMPLE_SLIDE", raising=False)
    for var in OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # as imported online
    calls: list[str] = []

    def retrieve(url, *_, **__):
        calls.append(url)
        raise OSError("no network in tests")

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    return calls


@pytest.mark.parametrize("var", ["TILESCOPE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_demo_slide_is_synthetic_without_a_download_attempt(
    var, no_sample, no_network, monkeypatch, tmp_path, capsys
):
    from tilescope.demo import demo_slide
    from tilescope.slide import Slide

    monkeypatch.setenv(var, "1")
    slide = demo_slide(None, tmp_path / "demo")
    assert no_sample == [] and no_network == []  # pooch never asked, no connection
    err = capsys.readouterr().err
    assert f"offline ({var}=1)" in err and "synthetic slide" in err and str(slide) in err
    assert "TILESCOPE_SAMPLE_SLIDE" in err  # how to use a local copy instead
    assert slide.parent == tmp_path / "demo" and slide.name == "synthetic-demo-slide.tif"
    with Slide(slide) as s:
        assert s.dimensions == (4096, 3072)


def test_online_demo_still_tries_the_download_then_falls_back(no_sample, tmp_path, capsys):
    from tilescope.demo import demo_slide

    slide = demo_slide(None, tmp_path)
    assert len(no_sample) == 1 and no_sample[0].endswith("CMU-1-Small-Region.svs")
    assert slide.name == "synthetic-demo-slide.tif"
    assert "could not download" in capsys.readouterr().err


def test_offline_default_model_goes_straight_to_the_cache(no_sample, no_network, monkeypatch):
    """TILESCOPE_OFFLINE alone (huggingface_hub itself online): no probe of the hub, a cache
    lookup only, and a message naming the setting and the ways to supply weights."""
    from tilescope.models import load_encoder

    monkeypatch.setenv("TILESCOPE_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        load_encoder(device="cpu")
    assert no_network == []
    msg = str(info.value)
    assert "downloads are off (TILESCOPE_OFFLINE=1)" in msg
    for way in ("HF_HUB_CACHE", "--model /path/to/folder", "tiny-random"):
        assert way in msg


def test_offline_demo_encoder_says_how_to_supply_weights(no_sample, no_network, monkeypatch,
                                                        capsys):  # fmt: skip
    from tilescope.demo import demo_encoder

    monkeypatch.setenv("TILESCOPE_OFFLINE", "1")
    enc = demo_encoder(device="cpu")
    assert not enc.trained and no_network == []
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "TILESCOPE_OFFLINE=1" in err and "--model /path/to/folder" in err


def test_offline_builtin_model_is_read_from_the_cache_only(no_sample, no_network, monkeypatch,
                                                          tmp_path):  # fmt: skip
    """An open_clip built-in (weights on the hub): open_clip would download them (and, given
    its tag, look them up online again when building); offline, the cached file is used and
    handed to open_clip as a file, with the tag's preprocessing."""
    from model_fixtures import hub_cache_add

    from tilescope._model_files import locate, parse_model_name

    monkeypatch.setenv("TILESCOPE_OFFLINE", "1")
    spec = parse_model_name("ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(WeightsNotFoundError, match=r"TILESCOPE_OFFLINE=1"):
        locate(spec)
    assert no_network == []

    src = tmp_path / "src"
    src.mkdir()
    (src / "open_clip_model.safetensors").write_bytes(b"not really weights")
    hub = Path(tmp_path / "hf" / "hub")
    hub_cache_add(hub, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", src,
                  ("open_clip_model.safetensors",))  # fmt: skip
    found = locate(spec)
    assert no_network == []
    assert found.weights.read_bytes() == b"not really weights"
    assert found.pretrained == str(found.weights)  # a file: open_clip looks nothing up
    assert found.create_kwargs["image_mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert found.create_kwargs["image_interpolation"] == "bicubic"


@pytest.mark.napari
def test_offline_open_sample_shows_a_synthetic_slide_and_says_why(
    no_sample, no_network, monkeypatch, make_napari_viewer
):
    monkeypatch.setenv("TILESCOPE_OFFLINE", "1")
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning, match=r"offline \(TILESCOPE_OFFLINE=1\)") as caught:
        viewer.open_sample("tilescope", "cmu_small_region")
    assert "synthetic slide" in str(caught[0].message)
    assert no_sample == [] and no_network == []
    assert viewer.layers[0].name == "synthetic-demo-slide.tif"
