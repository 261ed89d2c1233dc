"""The OpenVINO backend of the image tower (CPU).

The graph takes uint8 tiles (N, 224, 224, 3) as the readers produce them and returns unit-norm
embeddings: the uint8 -> float, /255, mean/std, the image tower and the L2 normalisation are all
inside it (`ImageGraph`). Tiles of another size are first resized exactly as the torch path does
(`Encoder.resize_tiles`).

The graph is converted once with ``openvino.convert_model`` and cached on disk
(`cache_dir`: ``$TILESCOPE_OPENVINO_CACHE``, else ``~/.cache/tilescope/openvino``), keyed by
the weights digest, the input size and preprocessing, the OpenVINO version and `GRAPH_VERSION`.
A conversion is written to a temporary folder and renamed into place, so a killed run leaves no
half-written entry under a real key; an entry that does not load is converted again.

Precision: bf16 where OpenVINO reports native bf16 on this CPU (``BF16`` in the CPU's
``OPTIMIZATION_CAPABILITIES``: AVX512-BF16 or AMX), fp32 everywhere else, set explicitly with
``INFERENCE_PRECISION_HINT`` (the plugin's own default is bf16 on such CPUs, fp32 elsewhere).

OpenVINO's conversion tool sends usage telemetry unless the user opted out; Tilescope sends none,
so conversions run with that telemetry declined (see `_no_telemetry`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ._torch_env import cpu_threads
from .errors import ModelError

if TYPE_CHECKING:
    import torch

    from ._encoder import Encoder
    from ._torch_images import Pending

#: Bump when `ImageGraph` changes: old cache entries are then never used.
GRAPH_VERSION = 1
CACHE_ENV = "TILESCOPE_OPENVINO_CACHE"
INSTALL_HELP = (
    "OpenVINO is not installed: `pip install 'tilescope[openvino]'` (or `pip install openvino`) "
    "adds it; or use --backend torch"
)
#: Performance hint of the compiled model. THROUGHPUT (one stream per core or so, each batch
#: split over the streams) ran 1.10x and 1.14x LATENCY (one stream over all cores), medians of
#: interleaved rounds on a busy 2-core AVX2 CPU; see bench_backends.py.
DEFAULT_HINT = "THROUGHPUT"
_CONVERT_LOCK = threading.RLock()
#: OpenVINO element types (as printed) -> Tilescope's precision names.
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def require_openvino() -> Any:
    """The ``openvino`` module, or a `ModelError` that says how to install it.

    Imported with OpenVINO's telemetry declined: ``import openvino`` itself sends an "import"
    event unless the user opted out (see `_no_telemetry`).
    """
    try:
        with _no_telemetry():  # the lock: a module another thread is importing is half-made
            if sys.modules.get("openvino") is not None:
                return sys.modules["openvino"]
            import openvino
    except ImportError as exc:
        raise ModelError(INSTALL_HELP) from exc
    return openvino


def available() -> bool:
    try:
        require_openvino()
    except ModelError:
        return False
    return True


def cpu_capabilities() -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of this CPU (e.g. FP32, INT8, BF16)."""
    ov = require_openvino()
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def choose_precision(capabilities: Sequence[str]) -> str:
    """``"bf16"`` where the CPU computes bf16 natively (OpenVINO reports BF16), else ``"fp32"``."""
    return "bf16" if "BF16" in {str(c).upper() for c in capabilities} else "fp32"


def compile_config(
    precision: str,
    hint: str = DEFAULT_HINT,
    streams: int | None = None,
    threads: int | None = None,
) -> dict:
    """The CPU plugin properties for `precision` ("bf16" or "fp32"); `threads` caps the cores
    the model runs on (None: OpenVINO's choice, every core)."""
    if precision not in ("bf16", "fp32"):
        raise ModelError(f"OpenVINO precision {precision!r}: use 'bf16' or 'fp32'")
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": precision.replace("fp", "f")}
    if streams:
        config["NUM_STREAMS"] = str(streams)
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def cache_dir() -> Path:
    """Where converted graphs are kept: ``$TILESCOPE_OPENVINO_CACHE`` or the user's cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tilescope" / "openvino"


def cache_key(encoder: Encoder, ov_version: str) -> str:
    """What the converted graph depends on, hashed: weights, input, preprocessing, versions."""
    parts = {
        "graph": GRAPH_VERSION,
        "weights": encoder.weights_digest,
        "input_hw": list(encoder.input_hw),
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "embed_dim": encoder.embed_dim,
        "openvino": ov_version,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def image_graph(encoder: Encoder) -> torch.nn.Module:
    """The torch module that is converted: uint8 NHWC -> unit-norm float32 embeddings."""
    import torch
    import torch.nn.functional as F

    class ImageGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = encoder.model.visual
            # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtract, one divide
            self.register_buffer("shift", torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255)
            self.register_buffer("scale", torch.tensor(encoder.std).view(1, 3, 1, 1) * 255)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shift, scale = cast(torch.Tensor, self.shift), cast(torch.Tensor, self.scale)
            x = (x.permute(0, 3, 1, 2).float() - shift) / scale
            return F.normalize(self.visual(x), dim=-1)

    return ImageGraph().eval()


@contextlib.contextmanager
def _no_telemetry() -> Iterator[None]:
    """Import OpenVINO and run its converter with its telemetry declined.

    ``import openvino`` and ``openvino.convert_model`` send usage events (and write a client id
    under ``~/intel``) unless the user opted out; their telemetry is initialised with
    ``disable_in_ci=True``, which treats ``CI=true`` as a refusal. The variable is set for the
    import or the conversion only, under a lock, and restored.
    """
    with _CONVERT_LOCK:
        old = os.environ.get("CI")
        os.environ["CI"] = "true"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("CI", None)
            else:
                os.environ["CI"] = old


def converted_graph(encoder: Encoder) -> tuple[Path, float | None]:
    """The cached OpenVINO IR of `encoder`'s image graph: (path of the .xml, seconds spent
    converting, or None when it came from the cache)."""
    ov = require_openvino()
    folder = cache_dir() / cache_key(encoder, ov.__version__)
    xml = folder / "image_graph.xml"
    if xml.is_file() and (folder / "meta.json").is_file():
        return xml, None
    import torch

    t0 = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        h, w = encoder.input_hw
        example = torch.zeros((1, h, w, 3), dtype=torch.uint8)
        with torch.no_grad(), _no_telemetry(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about timm's shape checks
            model = ov.convert_model(
                image_graph(encoder), example_input=example, input=[ov.PartialShape([-1, h, w, 3])]
            )
        ov.save_model(model, tmp / xml.name, compress_to_fp16=False)  # weights stay exact
        meta = {"model_id": encoder.model_id, "weights_digest": encoder.weights_digest,
                "input_hw": [h, w], "openvino": ov.__version__, "graph": GRAPH_VERSION}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            os.rename(tmp, folder)  # atomic: the entry appears whole or not at all
        except OSError:
            if not (folder / "meta.json").is_file():  # not another process's complete entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml, time.perf_counter() - t0


def forget(xml: Path) -> None:
    """Remove a cache entry that failed to load (it is converted again next time)."""
    trash = xml.parent.with_name(f".{xml.parent.name}.{uuid.uuid4().hex[:8]}.bad")
    with contextlib.suppress(OSError):
        os.rename(xml.parent, trash)
    shutil.rmtree(trash, ignore_errors=True)


class _Batch:
    """One submitted batch, split over the infer requests; `result` waits for every part."""

    def __init__(self, parts: int) -> None:
        self.outputs: list[np.ndarray | None] = [None] * parts
        self.left = parts
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def finish(self, i: int, output: np.ndarray | None, error: BaseException | None) -> None:
        with self._lock:
            self.outputs[i] = output
            self.error = self.error or error
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def result(self) -> np.ndarray:
        self.done.wait()
        if self.error is not None:
            raise ModelError(f"OpenVINO inference failed: {self.error}") from self.error
        return np.concatenate([o for o in self.outputs if o is not None])


class OpenVINOImages:
    """The image graph compiled for the CPU, behind the same `submit` as `TorchImages`.

    A batch is split over the compiled model's infer requests (one per stream) and queued on an
    ``AsyncInferQueue``: `submit` returns at once while requests are free, and waits for one
    otherwise (back-pressure). Results come back in submission order through ``result()``.
    """

    name = "openvino"
    compiled = False

    def __init__(
        self,
        encoder: Encoder,
        *,
        precision: str | None = None,
        hint: str = DEFAULT_HINT,
        streams: int | None = None,
    ) -> None:
        ov = require_openvino()
        self._enc = encoder
        core = ov.Core()
        self.capabilities = cpu_capabilities()
        self.requested_precision = precision or choose_precision(self.capabilities)
        # as many cores as torch may use where that was limited (a cohort worker's share)
        config = compile_config(self.requested_precision, hint, streams, cpu_threads())
        xml, self.convert_seconds = converted_graph(encoder)
        t0 = time.perf_counter()
        try:
            compiled = core.compile_model(str(xml), "CPU", config)
        except RuntimeError:
            if self.convert_seconds is not None:
                raise
            forget(xml)  # a damaged cache entry: convert again, once
            xml, self.convert_seconds = converted_graph(encoder)
            compiled = core.compile_model(str(xml), "CPU", config)
        self.compile_seconds = time.perf_counter() - t0
        # what the plugin will really compute in (it falls back to f32 where bf16 is not native)
        hint_type = compiled.get_property("INFERENCE_PRECISION_HINT")
        actual = hint_type.to_string() if hasattr(hint_type, "to_string") else str(hint_type)
        self.precision = _PRECISION_NAMES.get(actual, actual)
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        n_requests = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue = ov.AsyncInferQueue(compiled, max(1, n_requests))
        self._queue.set_callback(self._on_done)
        self._parts = max(1, n_requests)
        self.default_batch_size = max(16, 4 * self._parts)  # a few tiles per stream
        self._lock = threading.Lock()
        self.provenance = {
            "openvino_version": ov.__version__,
            "openvino_hint": hint,
            "cpu_capabilities": self.capabilities,
        }

    @staticmethod
    def _on_done(request: Any, userdata: tuple[_Batch, int]) -> None:
        batch, i = userdata
        try:
            batch.finish(i, np.array(request.get_output_tensor(0).data, copy=True), None)
        except BaseException as exc:  # never lose a part: result() re-raises it
            batch.finish(i, None, exc)

    def submit(self, tiles: torch.Tensor) -> Pending:
        """Queue uint8 (N, H, W, 3) tiles (any size: resized as the torch path does)."""
        x = self._enc.resize_tiles(tiles).cpu().numpy()
        chunks = [c for c in np.array_split(x, min(self._parts, len(x))) if len(c)]
        batch = _Batch(len(chunks))
        with self._lock:  # one batch's parts are queued together
            for i, chunk in enumerate(chunks):
                self._queue.start_async({0: np.ascontiguousarray(chunk)}, (batch, i))
        return batch
