"""The torch image path of an `Encoder`: uint8 tiles -> unit-norm embeddings, on any device.

On the CPU (and Apple MPS) a batch is computed when it is submitted. On CUDA nothing waits:

- the uint8 tiles go from pinned host memory to the GPU on a separate copy stream, so the copy
  of batch k+1 overlaps the model on batch k (the compute stream waits on an event, not on the
  host);
- the model runs in ``channels_last`` under bf16 autocast (fp16 before Ampere), optionally
  through ``torch.compile``;
- the embeddings are copied back non-blocking into a pinned buffer and a CUDA event is recorded;
  `Pending.result` waits on that event only. There is no ``synchronize`` and no ``.item()`` per
  batch, so a caller that submits batch k+1 before taking batch k's result keeps the GPU busy.

Examples
--------
>>> pending = encoder.submit_images(batch_k)            # doctest: +SKIP
>>> next_pending = encoder.submit_images(batch_k1)      # doctest: +SKIP
>>> emb_k = pending.result()  # float32 (N, D)          # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

    from ._encoder import Encoder

#: ``torch.compile`` backend used by ``compile=True`` (tests may use "eager": same logic, fast).
COMPILE_BACKEND = "inductor"


class Pending(Protocol):
    """A submitted batch; ``result()`` returns its float32 (N, D) embeddings (once ready)."""

    def result(self) -> np.ndarray: ...


class Ready:
    """A batch computed when submitted (CPU, MPS, OpenVINO sync paths)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self._embeddings = embeddings

    def result(self) -> np.ndarray:
        return self._embeddings


class CudaPending:
    """Embeddings on their way to a pinned host buffer; `result` waits on the copy's event."""

    def __init__(self, out: torch.Tensor, done: Any, n: int, keep: tuple[Any, ...]) -> None:
        self._out, self._done, self._n = out, done, n
        self._keep: tuple[Any, ...] | None = keep  # tensors the queued work still reads
        self._value: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._value is None:
            self._done.synchronize()  # this batch only: later submissions keep running
            self._value = self._out[: self._n].numpy().copy()  # pinned block back to the cache
            self._out, self._keep = None, None  # type: ignore[assignment]
        return self._value


class CudaOps:
    """The CUDA calls of the asynchronous path, in one place (tests swap in a CPU fake)."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def pinned(self, host: torch.Tensor) -> torch.Tensor:
        """`host` in page-locked memory (as it is if the reader pinned it already)."""
        return host if host.is_pinned() else host.pin_memory()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy pinned `host` to the GPU on the copy stream; the compute stream waits for it on
        the GPU (an event), the host does not."""
        import torch

        with torch.cuda.stream(self.copy_stream):
            x = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        x.record_stream(compute)  # allocated on the copy stream, read on the compute stream
        return x

    def pinned_empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        return torch.empty(shape, dtype=torch.float32, pin_memory=True)

    def record(self) -> Any:
        """An event after everything queued so far on the compute stream."""
        import torch

        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done


class TorchImages:
    """Embeds uint8 NHWC batches with the encoder's torch model on the encoder's device.

    Parameters
    ----------
    encoder
        The `Encoder` (its model, device, preprocessing and autocast dtype).
    compile
        Run preprocessing + image tower + normalisation through ``torch.compile``. Batches smaller
        than the largest seen are padded to it, so the last batch of a slide does not recompile.
    """

    name = "torch"

    def __init__(self, encoder: Encoder, *, compile: bool = False) -> None:
        import torch

        self._enc = encoder
        self.device: torch.device = encoder.device
        self.compiled = bool(compile)
        self._pad_to = 0
        self._lock = threading.Lock()
        self._cuda: Any = None
        if self.device.type == "cuda":
            encoder.model.visual.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # one input shape: the patch-embed conv
            self._cuda = CudaOps(self.device)
        forward = self._forward
        if self.compiled:
            forward = torch.compile(forward, backend=COMPILE_BACKEND, dynamic=False)
        self._run = forward

    @property
    def precision(self) -> str:
        import torch

        dtype = self._enc.autocast_dtype
        if dtype is None:
            return "fp32"
        return "bf16" if dtype == torch.bfloat16 else "fp16"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) on the device -> float32 (N, D), unit L2 norm."""
        import torch
        import torch.nn.functional as F

        enc = self._enc
        x = x.permute(0, 3, 1, 2).float()  # NHWC memory seen as NCHW: already channels_last
        if tuple(x.shape[-2:]) != enc.input_hw:
            x = enc._resize(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
        x = (x / 255.0 - enc._mean_t) / enc._std_t
        with enc._autocast():
            features = enc.model.encode_image(x)
        return F.normalize(features.float(), dim=-1)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """`_forward` (compiled or not) on the device; pads to one batch shape when compiled."""
        import torch

        n = len(x)
        if not self.compiled:
            return self._run(x)
        with self._lock:
            self._pad_to = max(self._pad_to, n)
            pad_to = self._pad_to
        if n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        return self._run(x)[:n]

    def submit(self, batch: torch.Tensor) -> Pending:
        """Start embedding a uint8 (N, H, W, 3) tensor (host or device); see the module doc."""
        import torch

        ops = self._cuda
        if ops is None:  # CPU, MPS: computed now
            with torch.inference_mode():
                return Ready(self._embed(batch.to(self.device)).cpu().numpy())
        on_gpu = batch.device.type == "cuda"
        x = batch if on_gpu else ops.to_device(ops.pinned(batch))
        with torch.inference_mode():
            emb = self._embed(x)
            out = ops.pinned_empty(tuple(emb.shape))
            out.copy_(emb, non_blocking=True)
        return CudaPending(out, ops.record(), len(batch), keep=(emb, x, batch))
