"""The `Encoder`: an open_clip model that embeds uint8 tiles and prompts on one device.

Preprocessing runs on the device in batch: uint8 -> float, /255, the model's mean/std, and for
tiles not at the model's size the resize + centre crop of open_clip's transform. The image tower
runs on a backend: torch (`tilescope._torch_images`, any device, asynchronous on CUDA) or
OpenVINO (`tilescope._openvino`, CPU); the text tower is always torch. Build one with
`tilescope.models.load_encoder`.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._torch_env import reuse_large_allocations
from .errors import ModelError

#: Prompt embeddings kept per encoder (a few hundred KB at 512-d).
TEXT_CACHE_SIZE = 1024

if TYPE_CHECKING:
    import torch

    from ._torch_images import Pending

UNTRAINED = "(UNTRAINED — not a result)"
#: `Encoder.compute_precision` -> the dtype name recorded as ``compute_dtype``.
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 (or fp16) autocast on CUDA; None (plain fp32) elsewhere."""
    import torch

    if device.type != "cuda":
        return None
    # native bf16 from Ampere (compute capability 8) on; older GPUs only emulate it, slowly
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


class Encoder:
    """An open_clip model with its tokenizer and preprocessing, encoding on one device.

    Build with `load_encoder`. Embeddings are L2-normalised float32, as
    ``model.encode_image(..., normalize=True)`` gives them; cosine similarity is a dot product
    and CLIP logits are ``logit_scale * cosine``.

    Attributes
    ----------
    model_id : str
        Canonical name: ``"hf-hub:org/name"``, ``"local-dir:/abs/path"``, ``"ViT-B-32:tag"``,
        ``"tiny-random"``.
    weights_digest : str
        sha256 of the weights file (of the state dict for models built in code). Compare this,
        not `model_id`, to know whether two runs used the same weights.
    trained : bool
        False for random weights; their output is labelled untrained everywhere.
    embed_dim, context_length, image_size : int
        Embedding size, token context, input side in pixels.
    logit_scale : float
        ``exp`` of the model's learned temperature.
    mean, std : tuple of float
        Per-channel normalisation of images in [0, 1].
    device : torch.device
    autocast_dtype : torch.dtype or None
        Mixed precision used on CUDA (bf16 if supported, else fp16); None = fp32.
    backend : str
        What runs the image tower: ``"torch"`` or ``"openvino"`` (CPU).
    compute_precision : str
        Precision of the image tower: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    default_batch_size : int
        Tiles per batch that suit the backend and device (256 on a large GPU, 16 on a CPU).
    label : str
        For display; untrained models say so.
    model, tokenizer, open_clip_preprocess
        The open_clip objects (``open_clip_preprocess`` takes a PIL image).

    Notes
    -----
    Image encoding runs one batch at a time per model (torch releases the GIL; the prompt cache
    is locked), so one Encoder may serve the widgets and a worker thread.
    On Apple MPS and on CPU torch computes in float32; OpenVINO in bf16 where the CPU has it
    natively, else float32.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        preprocess: Any,
        *,
        model_id: str,
        weights_digest: str,
        trained: bool,
        embed_dim: int,
        device: torch.device,
        source: str,
    ) -> None:
        import torch

        if device.type == "cpu":
            reuse_large_allocations()  # activations reused, not mapped afresh each batch
        clip: Any = model.to(device).eval()  # open_clip CLIP / CustomTextCLIP
        self.model = clip
        self.tokenizer = tokenizer
        self.open_clip_preprocess = preprocess
        self.model_id = model_id
        self.weights_digest = weights_digest
        self.trained = trained
        self.embed_dim = int(embed_dim)
        self.device = device
        self.source = source
        self.autocast_dtype = _autocast_dtype(device)
        self.label = model_id if trained else f"{model_id} {UNTRAINED}"
        self.context_length = int(tokenizer.context_length)
        self.logit_scale = float(clip.logit_scale.detach().float().exp().reshape(-1)[0])
        pp: dict[str, Any] = clip.visual.preprocess_cfg
        size = pp["size"]
        self._hw: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size[-2:])
        self.image_size = int(self._hw[0])
        self.mean = tuple(float(m) for m in pp["mean"])
        self.std = tuple(float(s) for s in pp["std"])
        self._resize_mode = pp.get("resize_mode", "shortest")
        interpolation = pp.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            raise ModelError(
                f"{model_id}: preprocessing interpolation {interpolation!r} is not supported "
                "(bicubic or bilinear)"
            )
        self._interpolation = interpolation
        self._fill = float(pp.get("fill_color", 0))
        self._mean_t = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_lock = threading.Lock()  # widgets encode prompts from worker threads
        self._images: Any = None
        self.set_image_backend("torch")

    def set_image_backend(self, backend: str | Any, *, compile: bool = False) -> None:
        """Run the image tower on ``"torch"`` (this encoder's device) or on a backend object
        (`tilescope._openvino.OpenVINOImages`). `compile`: ``torch.compile`` (torch only)."""
        if isinstance(backend, str):
            from ._torch_images import TorchImages

            if backend != "torch":
                raise ModelError(f"unknown image backend {backend!r}")
            backend = TorchImages(self, compile=compile)
        self._images = backend

    @property
    def backend(self) -> str:
        return str(self._images.name)

    @property
    def compute_precision(self) -> str:
        return str(self._images.precision)

    @property
    def cpu_threads(self) -> int | None:
        """Threads the image tower runs on when it runs on the CPU (None on a GPU)."""
        if self.device.type != "cpu":
            return None
        threads = getattr(self._images, "threads", None)  # OpenVINO's own pool
        if threads:
            return int(threads)
        import torch

        return int(torch.get_num_threads())

    def describe_tower(self) -> str:
        """What runs the image tower, for a person: ``openvino bf16 on cpu, 2 threads``."""
        threads = self.cpu_threads
        where = f"{self.device}" + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")
        return f"{self.backend} {self.compute_precision} on {where}"

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the image tower's input."""
        return self._hw

    @property
    def default_batch_size(self) -> int:
        """Tiles per batch for this device and backend (what `tilescope embed` uses)."""
        if self.device.type == "cuda":
            import torch

            memory = torch.cuda.get_device_properties(self.device).total_memory
            return 256 if memory >= 12 * 2**30 else 64
        if self.device.type == "mps":
            return 64
        return int(getattr(self._images, "default_batch_size", 16))

    def __repr__(self) -> str:
        return (
            f"Encoder({self.label!r}, embed_dim={self.embed_dim}, device={self.device}, "
            f"backend={self.backend} {self.compute_precision})"
        )

    def provenance(self) -> dict[str, Any]:
        """What produced the embeddings, JSON-serialisable (for store signatures)."""
        import open_clip
        import torch

        return {
            "model_id": self.model_id,
            "weights_digest": self.weights_digest,
            "trained": self.trained,
            "label": self.label,
            "source": self.source,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize_mode": self._resize_mode,
            "interpolation": self._interpolation,
            "logit_scale": self.logit_scale,
            "backend": self.backend,
            "compute_precision": self.compute_precision,
            "compute_dtype": _DTYPE_NAMES[self.compute_precision],
            "compiled": bool(getattr(self._images, "compiled", False)),
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
            **dict(getattr(self._images, "provenance", {})),
        }

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop (or pad) float (N, 3, H, W) in [0, 255] as open_clip would."""
        import torch.nn.functional as F

        (th, tw), (h, w) = self._hw, tuple(x.shape[-2:])
        if self._resize_mode == "squash":
            size = (th, tw)
        elif self._resize_mode == "longest":
            scale = min(th / h, tw / w)
            size = (round(h * scale), round(w * scale))
        elif th == tw:  # torchvision Resize(int): shortest side to th, longest truncated
            short, long = min(h, w), max(h, w)
            new_long = int(th * long / short)
            size = (th, new_long) if h <= w else (new_long, th)
        else:
            scale = max(th / h, tw / w)
            size = (round(h * scale), round(w * scale))
        if size != (h, w):
            on = x.device
            y = x.cpu() if on.type == "mps" else x  # no antialiased bicubic kernel on MPS
            y = F.interpolate(y, size=size, mode=self._interpolation, antialias=True)
            x = y.to(on).clamp_(0, 255).round_()  # as PIL resizes uint8
        h, w = size
        if (h, w) == (th, tw):
            return x
        if h < th or w < tw:  # pad ("longest"), centred
            top, left = (th - h) // 2, (tw - w) // 2
            pad = (left, tw - w - left, top, th - h - top)
            return F.pad(x, pad, value=self._fill)
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return x[..., top : top + th, left : left + tw]

    def as_tiles(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`batch` as a uint8 (N, H, W, 3) tensor (no copy); `ModelError` for anything else."""
        import torch

        x = (
            torch.from_numpy(np.ascontiguousarray(batch))
            if isinstance(batch, np.ndarray)
            else batch
        )
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ModelError(
                f"{self.model_id}: tiles must be uint8 RGB of shape (N, H, W, 3), got "
                f"{x.dtype} {tuple(x.shape)}."
            )
        return x

    def resize_tiles(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) tiles at the model's input size, exactly as the torch path
        preprocesses them (`_resize`: its output is whole grey levels), for backends that take
        uint8 input. Tiles already at the size are returned as they are."""
        import torch

        if tuple(batch.shape[1:3]) == self._hw:
            return batch
        with torch.inference_mode():
            x = self._resize(batch.cpu().permute(0, 3, 1, 2).float())
            return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def submit_images(self, batch: np.ndarray | torch.Tensor) -> Pending:
        """Start embedding a batch of RGB tiles; ``.result()`` gives what `encode_images` gives.

        On CUDA the copies and the model run asynchronously: submit batch k+1 before taking
        batch k's result and the GPU never waits for the host (see `tilescope._torch_images`).
        On the CPU the batch is computed here (torch) or queued on OpenVINO's infer requests.
        """
        from ._torch_images import Ready

        x = self.as_tiles(batch)
        if len(x) == 0:
            return Ready(np.zeros((0, self.embed_dim), np.float32))
        return self._images.submit(x)

    def encode_images(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Embed a batch of RGB tiles.

        Parameters
        ----------
        batch
            uint8 array or tensor (N, H, W, 3). Tiles at the model's size go straight to
            normalisation; others are resized (shortest side, bicubic, antialiased) and
            centre-cropped, as open_clip's transform does.

        Returns
        -------
        numpy.ndarray
            float32 (N, embed_dim), rows of unit L2 norm.
        """
        return self.submit_images(batch).result()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (P, context_length); warns for each prompt that had to be truncated."""
        return self._tokenize(prompts, stacklevel=3)

    def _tokenize(self, prompts: Sequence[str], stacklevel: int) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for prompt in prompts:
            n = self._token_count(prompt)
            if n is not None and n > self.context_length:
                warnings.warn(
                    f"Prompt {prompt[:80]!r}{'...' if len(prompt) > 80 else ''} has {n} tokens; "
                    f"{self.model_id} reads only the first {self.context_length}.",
                    UserWarning,
                    stacklevel=stacklevel,
                )
        return self.tokenizer(prompts)

    def _token_count(self, prompt: str) -> int | None:
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        tok = self.tokenizer
        if isinstance(tok, HFTokenizer):
            return len(tok.tokenizer(tok.clean_fn(prompt), add_special_tokens=True)["input_ids"])
        if isinstance(tok, SimpleTokenizer):
            return len(tok.encode(prompt)) + 2  # start and end of text
        return None

    def encode_text(self, prompts: Sequence[str]) -> np.ndarray:
        """Embed prompts: float32 (P, embed_dim), unit L2 norm; truncation warns (`tokenize`).

        Prompts seen before come from a small cache, so editing one class of a prompt set
        encodes only that class. For Hugging Face text towers (BiomedCLIP's BERT) the trailing
        padding of the 256-token context is cut to the batch's longest prompt before the forward
        pass: those towers mask padding out, so the result is the same (to float rounding,
        about 1e-7) and short prompts cost a fraction.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._text_lock:
            new = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
            if new:
                for prompt, vec in zip(new, self._encode_text_uncached(new), strict=True):
                    self._text_cache[prompt] = vec
            out = np.zeros((len(prompts), self.embed_dim), np.float32)
            for i, prompt in enumerate(prompts):
                out[i] = self._text_cache[prompt]
                self._text_cache.move_to_end(prompt)
            while len(self._text_cache) > TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return out

    def _encode_text_uncached(self, prompts: list[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        tokens = self._tokenize(prompts, stacklevel=4)
        if len(tokens) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self._trim_padding(tokens)
        with torch.inference_mode(), self._autocast():
            features = self.model.encode_text(tokens.to(self.device))
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def _trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop the columns that are padding in every prompt, for text towers that mask it."""
        from open_clip.hf_model import HFTextEncoder

        text = getattr(self.model, "text", None)
        if not isinstance(text, HFTextEncoder):
            return tokens  # open_clip's own text transformer pools by position: keep as is
        used = (tokens != text.config.pad_token_id).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens
