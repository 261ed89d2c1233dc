"""Image-tower backends: OpenVINO against torch fp32, backend choice, the converted-graph cache,
asynchronous submission (the CUDA logic with a CPU fake), provenance and the hash cache."""

from __future__ import annotations

import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _paths import CMU, PATCHES, need

from tilescope import _hash_cache, _openvino, _torch_images
from tilescope.errors import ModelError
from tilescope.models import build_biomedclip_architecture, load_encoder, resolve_backend

if not _openvino.available():
    pytest.skip(
        "OpenVINO is not installed (pip install 'tilescope[openvino]')", allow_module_level=True
    )
ov = _openvino.require_openvino()  # imported with its telemetry declined


def crc_patches() -> np.ndarray:
    from PIL import Image

    files = sorted(need(PATCHES).glob("*.png"))
    assert len(files) == 32
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def cmu_tiles(n: int = 16, size: int = 224) -> np.ndarray:
    """`n` tissue tiles of CMU-1-Small-Region at 0.5 µm/px, `size` px."""
    from tilescope.grid import TileGrid
    from tilescope.slide import Slide
    from tilescope.tissue import tissue_mask

    with Slide(need(CMU)) as slide:
        layout = TileGrid(tile_px=size).layout(slide, tissue_mask(slide))
        order = np.argsort(-layout.tissue, kind="stable")[:n]
        return np.stack(
            [slide.read_region_mpp(tuple(layout.coords[i]), (size, size), mpp=0.5) for i in order]
        )


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.fixture(scope="module")
def real_tiles() -> np.ndarray:
    return np.concatenate([crc_patches(), cmu_tiles(16)])


@pytest.fixture(scope="module")
def tiny_ov():
    """tiny-random on OpenVINO (the session's cache folder: see model_fixtures.py)."""
    return load_encoder("tiny-random", device="cpu", backend="openvino")


def test_require_openvino_waits_for_an_import_in_another_thread(monkeypatch):
    """While one thread imports OpenVINO, `sys.modules` holds the half-made module: another
    thread (the heatmap's encoder load beside Embed's) must wait for it, not get a module
    without ``Core`` ("partially initialized module 'openvino' has no attribute 'Core'")."""
    real = _openvino.require_openvino()
    got: list[object] = []
    worker = threading.Thread(target=lambda: got.append(_openvino.require_openvino()))
    with _openvino._CONVERT_LOCK:  # as the importing thread holds it
        monkeypatch.setitem(sys.modules, "openvino", types.ModuleType("openvino"))
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not got, "took the half-imported module"
        sys.modules["openvino"] = real
    worker.join(10)
    assert got == [real]


def test_openvino_matches_torch_fp32_tiny_on_real_tiles(tiny_encoder, tiny_ov, real_tiles):
    ref = tiny_encoder.encode_images(real_tiles)
    got = tiny_ov.encode_images(real_tiles)
    assert min_cosine(got, ref) >= 0.999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert tiny_encoder.backend == "torch" and tiny_ov.backend == "openvino"
    want = _openvino.choose_precision(_openvino.cpu_capabilities())
    assert tiny_ov.compute_precision == want
    # the text tower stays torch: same prompts, same embeddings
    prompts = ["tumor", "normal colon mucosa"]
    # the text tower stays torch (equal up to torch's thread-dependent float rounding)
    np.testing.assert_allclose(tiny_ov.encode_text(prompts), tiny_encoder.encode_text(prompts),
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("size", [256, 200])
def test_openvino_resizes_other_tile_sizes_as_torch_does(tiny_encoder, tiny_ov, size):
    tiles = cmu_tiles(6, size=size)
    x = torch.from_numpy(tiles)
    resized = tiny_encoder.resize_tiles(x)
    assert resized.dtype == torch.uint8 and tuple(resized.shape[1:3]) == (224, 224)
    # the uint8 tiles are exactly what the torch path feeds its normalisation
    ref_float = tiny_encoder._resize(x.permute(0, 3, 1, 2).float())
    assert torch.equal(resized.permute(0, 3, 1, 2).float(), ref_float)
    assert min_cosine(tiny_ov.encode_images(tiles), tiny_encoder.encode_images(tiles)) >= 0.9999


@pytest.mark.slow
def test_full_size_architecture_openvino_matches_torch_fp32(real_tiles):
    torch_enc = build_biomedclip_architecture(device="cpu", backend="torch")
    ref = torch_enc.encode_images(real_tiles)
    torch_enc.set_image_backend(_openvino.OpenVINOImages(torch_enc))
    assert torch_enc.backend == "openvino"
    got = torch_enc.encode_images(real_tiles)
    assert got.shape == (len(real_tiles), 512)
    assert min_cosine(got, ref) >= 0.999


def test_submit_many_before_results(tiny_encoder, tiny_ov, real_tiles):
    batches = [real_tiles[i : i + 7] for i in range(0, 28, 7)]
    for enc in (tiny_encoder, tiny_ov):
        pending = [enc.submit_images(b) for b in batches]  # all in flight
        got = np.concatenate([p.result() for p in reversed(pending)][::-1])
        assert np.allclose(got, enc.encode_images(np.concatenate(batches)), atol=1e-5)
        assert enc.submit_images(real_tiles[:0]).result().shape == (0, enc.embed_dim)


def test_cache_is_reused_and_keyed(tiny_encoder, tiny_ov, monkeypatch):
    assert tiny_ov._images.convert_seconds is not None or tiny_ov._images.compile_seconds
    again = _openvino.OpenVINOImages(tiny_encoder)  # the fixture converted already
    assert again.convert_seconds is None

    class Other:
        weights_digest, input_hw, mean, std, embed_dim = "a" * 64, (224, 224), (0.5,), (0.2,), 64

    base = _openvino.cache_key(Other(), "2026.4")  # type: ignore[arg-type]
    changed = []
    for attr, value in (("weights_digest", "b" * 64), ("input_hw", (256, 256))):
        other = Other()
        setattr(other, attr, value)
        changed.append(_openvino.cache_key(other, "2026.4"))  # type: ignore[arg-type]
    changed.append(_openvino.cache_key(Other(), "2026.5"))  # type: ignore[arg-type]
    assert len({base, *changed}) == 4


def test_killed_conversion_leaves_nothing_trusted(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv(_openvino.CACHE_ENV, str(tmp_path / "cache"))
    real_save = ov.save_model

    def save_then_die(model, path, **kw):
        real_save(model, path, **kw)
        Path(path).with_suffix(".bin").write_bytes(b"half")  # a half-written weights file
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ov, "save_model", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _openvino.OpenVINOImages(tiny_encoder)
    assert not any((tmp_path / "cache").iterdir())  # no entry, no temporary folder
    monkeypatch.setattr(ov, "save_model", real_save)
    fresh = _openvino.OpenVINOImages(tiny_encoder)
    assert fresh.convert_seconds is not None
    x = cmu_tiles(4)
    ref = tiny_encoder.encode_images(x)
    # a damaged entry (truncated weights) is converted again, not trusted
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "image_graph.bin").write_bytes(b"\0" * 16)
    repaired = _openvino.OpenVINOImages(tiny_encoder)
    assert repaired.convert_seconds is not None
    assert min_cosine(repaired.submit(torch.from_numpy(x)).result(), ref) >= 0.9999


def test_import_and_conversion_send_no_telemetry(tmp_path):
    """``import openvino`` and ``convert_model`` send usage events unless the user opted out
    (36 attempts for one conversion of the tiny model, measured without the guard); Tilescope
    declines. In a fresh process with no consent file (OpenVINO's default) and CI unset."""
    import subprocess

    code = (
        "import openvino_telemetry.utils.sender as s\n"
        "sent = []\n"
        "s.TelemetrySender.send = lambda self, *a, **k: sent.append(a)\n"
        "from tilescope import _openvino\n"
        "from tilescope.models import load_encoder\n"
        "enc = load_encoder('tiny-random', device='cpu', backend='openvino')\n"
        "import os\n"
        "print('SENT', len(sent), 'CI' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(HOME=str(tmp_path / "home"), **{_openvino.CACHE_ENV: str(tmp_path / "cache")})
    (tmp_path / "home").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SENT 0 False" in done.stdout
    assert not (tmp_path / "home" / "intel").exists()  # no client id written either


def test_auto_picks_openvino_bf16_exactly_where_the_cpu_has_it(monkeypatch, tiny_encoder):
    assert _openvino.choose_precision(["FP32", "INT8", "BIN", "EXPORT_IMPORT"]) == "fp32"
    assert _openvino.choose_precision(["FP32", "BF16", "FP16", "INT8"]) == "bf16"
    assert _openvino.compile_config("bf16")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert _openvino.compile_config("fp32")["INFERENCE_PRECISION_HINT"] == "f32"
    monkeypatch.setattr(_openvino, "cpu_capabilities", lambda: ["FP32", "BF16", "INT8"])
    assert resolve_backend("auto", "cpu") == (torch.device("cpu"), "openvino")
    assert resolve_backend("auto", "cpu", compile=True)[1] == "torch"
    configs = []
    real = _openvino.compile_config
    monkeypatch.setattr(
        _openvino, "compile_config", lambda *a: configs.append(real(*a)) or real(*a)
    )
    images = _openvino.OpenVINOImages(tiny_encoder)
    assert images.requested_precision == "bf16"
    assert configs[-1]["INFERENCE_PRECISION_HINT"] == "bf16"
    # recorded: what the plugin computes in (this CPU may not have bf16 and fall back to f32)
    assert images.precision in ("bf16", "fp32")
    monkeypatch.setattr(_openvino, "cpu_capabilities", lambda: ["FP32", "INT8"])
    assert resolve_backend("auto", "cpu") == (torch.device("cpu"), "torch")
    assert resolve_backend("torch", "cpu")[1] == "torch"


def test_backend_errors_are_clear(monkeypatch):
    with pytest.raises(ModelError, match="Unknown backend 'onnx'"):
        resolve_backend("onnx", "cpu")
    with pytest.raises(ModelError, match="runs on the CPU, not on 'cuda'"):
        resolve_backend("openvino", "cuda")
    with pytest.raises(ModelError, match="--compile"):
        resolve_backend("openvino", "cpu", compile=True)
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with pytest.raises(ModelError, match=r"pip install 'tilescope\[openvino\]'"):
        load_encoder("tiny-random", backend="openvino")
    assert resolve_backend("auto", "cpu")[1] == "torch"  # auto falls back


def test_openvino_uses_the_cores_torch_may_use():
    """A cohort worker shares its host by limiting torch's threads; OpenVINO (which ignores
    torch and OMP_NUM_THREADS) must keep to the same share, else two workers on one host each
    run on every core."""
    from tilescope._torch_env import available_cpus

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_encoder("tiny-random", device="cpu", backend="openvino")
        assert one._images.threads == 1
        assert _openvino.compile_config("fp32", threads=1)["INFERENCE_NUM_THREADS"] == "1"
        torch.set_num_threads(available_cpus())
        every = load_encoder("tiny-random", device="cpu", backend="openvino")
        assert every._images.threads == available_cpus()  # not limited: OpenVINO's own choice
        assert "INFERENCE_NUM_THREADS" not in _openvino.compile_config("fp32")
    finally:
        torch.set_num_threads(before)


def test_compile_pads_to_one_shape(tiny_encoder, monkeypatch, real_tiles):
    monkeypatch.setattr(_torch_images, "COMPILE_BACKEND", "eager")  # the logic, not inductor
    enc = load_encoder("tiny-random", device="cpu", backend="torch", compile=True)
    shapes = []
    compiled = enc._images._run
    assert compiled is not enc._images._forward  # torch.compile's wrapper
    monkeypatch.setattr(enc._images, "_run", lambda x: shapes.append(len(x)) or compiled(x))
    got = np.concatenate([enc.encode_images(real_tiles[:8]), enc.encode_images(real_tiles[8:11])])
    assert set(shapes) == {8}  # the batch of 3 ran padded to 8
    assert np.allclose(got, tiny_encoder.encode_images(real_tiles[:11]), atol=1e-6)
    assert enc.provenance()["compiled"] is True


class FakeEvent:
    def __init__(self, log: list, n: int) -> None:
        self.log, self.n = log, n

    def synchronize(self) -> None:
        self.log.append(("wait", self.n))


class FakeCuda:
    """`CudaOps` on the CPU, logging what the asynchronous path asks of CUDA."""

    def __init__(self) -> None:
        self.log: list = []
        self.events = 0

    def pinned(self, host):
        self.log.append(("pin", len(host)))
        return host

    def to_device(self, host):
        self.log.append(("h2d", len(host)))
        return host.clone()

    def pinned_empty(self, shape):
        self.log.append(("out", shape[0]))
        return torch.full(shape, float("nan"))

    def record(self):
        self.events += 1
        self.log.append(("event", self.events))
        return FakeEvent(self.log, self.events)


def test_cuda_path_waits_only_on_its_own_event(tiny_encoder, real_tiles, monkeypatch):
    """The CUDA logic with a CPU fake: it cannot show the GPU overlaps, only that submissions
    never wait, that each result waits on its own batch's event, and that the output goes
    through a pinned buffer."""
    images = _torch_images.TorchImages(tiny_encoder)
    fake = FakeCuda()
    images._cuda = fake
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: fake.log.append("SYNC"))
    a, b, c = real_tiles[:5], real_tiles[5:12], real_tiles[12:14]
    pending = [images.submit(torch.from_numpy(x)) for x in (a, b, c)]
    assert not [e for e in fake.log if e[0] == "wait" or e == "SYNC"]  # nothing waited yet
    assert fake.log[:5] == [("pin", 5), ("h2d", 5), ("out", 5), ("event", 1), ("pin", 7)]
    second = pending[1].result()
    assert fake.log[-1] == ("wait", 2)
    assert np.allclose(second, tiny_encoder.encode_images(b), atol=1e-6)
    first = pending[0].result()
    assert pending[0].result() is first and fake.log.count(("wait", 1)) == 1
    assert np.allclose(first, tiny_encoder.encode_images(a), atol=1e-6)
    assert pending[2].result().shape == (2, tiny_encoder.embed_dim)
    assert "SYNC" not in fake.log


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv(_hash_cache.CACHE_ENV, str(tmp_path / "cache"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x" * 1000)
    reads = []
    real = _hash_cache.hash_file
    monkeypatch.setattr(_hash_cache, "hash_file", lambda p: reads.append(p) or real(p))
    first = _hash_cache.sha256_cached(f)
    assert _hash_cache.sha256_cached(f) == first and len(reads) == 1  # from the cache
    link = tmp_path / "link.bin"
    link.symlink_to(f)
    assert _hash_cache.sha256_cached(link) == first and len(reads) == 1  # same file
    f.write_bytes(b"y" * 1000)  # same size, new content and mtime
    os.utime(f, ns=(1, 1))
    second = _hash_cache.sha256_cached(f)
    assert len(reads) == 2 and second != first and second == real(f)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == ["hashes.json"]  # written atomically: no temporary left
    (tmp_path / "cache" / "hashes.json").write_text("{not json")
    assert _hash_cache.sha256_cached(f) == second and len(reads) == 3  # damaged: hashed again


def test_loading_a_weights_file_twice_hashes_it_once(snapshot_dir, offline_hub, monkeypatch):
    reads = []
    real = _hash_cache.hash_file
    monkeypatch.setattr(_hash_cache, "hash_file", lambda p: reads.append(p) or real(p))
    a = load_encoder(str(snapshot_dir), device="cpu", backend="torch")
    b = load_encoder(str(snapshot_dir), device="cpu", backend="torch")
    assert a.weights_digest == b.weights_digest and len(reads) <= 1


def test_resume_with_another_backend_is_a_notice_and_agrees(tiny_encoder, tiny_ov, tmp_path):
    from tilescope.embed import embed_slide
    from tilescope.errors import StoreNotice
    from tilescope.store import EmbeddingStore

    ref = embed_slide(need(CMU), tmp_path / "ref.zarr", encoder=tiny_encoder, num_workers=0)
    out = tmp_path / "cmu.zarr"
    calls: list[int] = []  # stop after the first batch (polls: tissue, start, batch 1); the
    # batch in flight then is written too
    part = embed_slide(CMU, out, encoder=tiny_encoder, batch_size=16, num_workers=0,
                       should_stop=lambda: calls.append(1) or len(calls) >= 3)  # fmt: skip
    assert not part.complete and EmbeddingStore.open(out).n_done == part.embedded_now
    assert part.embedded_now in (16, 32)
    with pytest.warns(StoreNotice) as notes:
        done = embed_slide(CMU, out, encoder=tiny_ov, batch_size=16, num_workers=0)
    (note,) = [str(n.message) for n in notes if issubclass(n.category, StoreNotice)]  # just one
    assert "model.backend: store has 'torch', this run 'openvino'" in note
    if tiny_ov.compute_precision == "bf16":
        assert "model.compute_precision: store has 'fp32', this run 'bf16'" in note
    assert done.complete and done.embedded_now == ref.n_tiles - part.embedded_now
    store = EmbeddingStore.open(out)
    model = store.signature["model"]
    assert model["backend"] == "torch" and model["compute_precision"] == "fp32"
    assert "openvino_version" not in model  # the store keeps the provenance it was made with
    a, b = store.embeddings, EmbeddingStore.open(ref.store_path).embeddings
    assert min_cosine(a, b) >= 0.999


def test_signature_records_backend_and_precision(tiny_ov):
    prov = tiny_ov.provenance()
    assert prov["backend"] == "openvino"
    assert prov["compute_precision"] == tiny_ov.compute_precision
    assert (
        prov["compute_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[prov["compute_precision"]]
    )
    assert prov["openvino_version"] == ov.__version__
    assert prov["cpu_capabilities"] == _openvino.cpu_capabilities()


def test_widget_encoder_cache_is_keyed_by_resolved_device_and_backend(tiny_ov):
    from tilescope._napari import _common

    # auto: the CPU here, and torch or OpenVINO bf16 as this CPU decides
    _, picked = resolve_backend("auto", "auto")
    other = "openvino" if picked == "torch" else "torch"
    auto = _common.get_encoder("tiny-random", "auto", "auto")
    assert auto.backend == picked
    assert _common.get_encoder("tiny-random", None, picked) is auto
    assert _common.get_encoder("tiny-random", "cpu", picked) is auto
    assert _common.get_encoder("tiny-random", "cpu") is auto  # backend None: any loaded one
    second = _common.get_encoder("tiny-random", "cpu", other)
    assert second is not auto and second.backend == other
    assert _common.get_encoder("tiny-random", "cpu", other) is second
    assert _common.get_encoder("tiny-random", "auto", "auto") is auto


@pytest.mark.napari
def test_embed_widget_backend_choice(make_napari_viewer, tmp_path):
    from tilescope._napari._embed_widget import EmbedWidget
    from tilescope.store import EmbeddingStore

    viewer = make_napari_viewer()
    viewer.open(str(need(CMU)), plugin="tilescope")
    widget = EmbedWidget(viewer)
    assert list(widget._backend.choices) == ["auto", "torch", "openvino"]
    assert widget._backend.value == "auto"
    widget._model.value = "tiny-random"
    widget._mpp.value = 2.0
    widget._out_dir.value = tmp_path
    widget._backend.value = "openvino"
    assert widget.request().backend == "openvino"
    widget.synchronous = True
    widget._run.native.click()
    assert widget.last_result is not None and widget.last_result.complete
    model = EmbeddingStore.open(widget.last_result.store_path).signature["model"]
    assert model["backend"] == "openvino"


def test_auto_falls_back_to_torch_when_openvino_cannot_convert(monkeypatch):
    monkeypatch.setattr(_openvino, "cpu_capabilities", lambda: ["FP32", "BF16"])

    def cannot(self, encoder, **kw):
        raise RuntimeError("unsupported operation aten::foo")

    monkeypatch.setattr(_openvino.OpenVINOImages, "__init__", cannot)
    with pytest.warns(UserWarning, match="OpenVINO could not take the image tower"):
        enc = load_encoder("tiny-random", device="cpu")
    assert enc.backend == "torch"
    with pytest.raises(ModelError, match="aten::foo.*use --backend torch"):
        load_encoder("tiny-random", device="cpu", backend="openvino")


def test_cli_backend_flag(tmp_path, capsys, tiny_ov):
    from tilescope.cli import main
    from tilescope.store import EmbeddingStore

    out = tmp_path / "cmu.zarr"
    args = ["embed", str(need(CMU)), "-o", str(out), "--model", "tiny-random", "--mpp", "2"]
    assert main([*args, "--backend", "openvino"]) == 0
    printed = capsys.readouterr().out
    n = tiny_ov.cpu_threads
    assert n is not None and n >= 1
    tower = f"openvino {tiny_ov.compute_precision} on cpu, {n} thread{'s' * (n != 1)}"
    assert f"image tower: {tower}, 16 tiles per batch" in printed
    assert EmbeddingStore.open(out).signature["model"]["backend"] == "openvino"
    assert main([*args, "--backend", "openvino", "--device", "cuda"]) == 1
    assert "runs on the CPU, not on 'cuda'" in capsys.readouterr().err
