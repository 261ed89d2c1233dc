"""Load an open_clip model (BiomedCLIP by default) and encode tiles and prompts with it.

`load_encoder` accepts BiomedCLIP's hub id (the default), the alias ``"biomedclip"``, any
open_clip hub id, a local folder holding a downloaded snapshot, an open_clip built-in model with
its weights tag (``"ViT-B-32:laion2b_s34b_b79k"``), or ``"tiny-random"``: a small untrained
model of the same family (timm ViT + Hugging Face BERT) built offline, for tests and demos.
Models are built the way BiomedCLIP's model card does (``create_model_from_pretrained`` +
``get_tokenizer``), after every file has been found locally (see `OFFLINE_WEIGHTS_HELP`).

Examples
--------
>>> import numpy as np
>>> enc = load_encoder("tiny-random")
>>> enc.encode_images(np.zeros((2, 224, 224, 3), np.uint8)).shape
(2, 64)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _model_files as files
from ._encoder import Encoder
from ._model_files import DEFAULT_REPO, TINY_NAME
from .errors import ModelError, TilescopeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_WEIGHTS_HELP",
    "TINY_MODEL",
    "Encoder",
    "BACKENDS",
    "build_biomedclip_architecture",
    "load_encoder",
    "load_encoder_for_store",
    "pick_device",
    "resolve_backend",
]

DEFAULT_MODEL = f"hf-hub:{DEFAULT_REPO}"
#: Image-tower backends (`load_encoder`'s `backend`); the text tower always runs in torch.
BACKENDS = ("auto", "torch", "openvino")
TINY_MODEL = TINY_NAME

OFFLINE_WEIGHTS_HELP = """\
### Using BiomedCLIP offline

Tilescope downloads BiomedCLIP from the Hugging Face hub the first time it is used and works
offline from the cache afterwards. Set `TILESCOPE_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) to
make sure nothing is fetched: models then come from the cache or a folder only, with no lookup
on the hub, and the sample slide is never downloaded.
Two hub repositories are involved:

- `microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`: `open_clip_config.json`,
  `open_clip_pytorch_model.bin` (784 MB), and the tokenizer: `tokenizer.json`,
  `tokenizer_config.json`, `special_tokens_map.json`, `vocab.txt`;
- `microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract`: `config.json` only, the
  architecture of the text encoder (its weights are inside the BiomedCLIP file).

**Fill the cache** on a machine with internet (`huggingface-cli download` on older
`huggingface_hub`), then copy the cache folder (`~/.cache/huggingface/hub`, or `$HF_HUB_CACHE`)
to the offline machine and point `HF_HOME` or `HF_HUB_CACHE` at it:

    hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    hf download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json

**Or make one self-contained folder** and pass its path as the model
(`tilescope ... --model /path/to/biomedclip`, or `load_encoder("/path/to/biomedclip")`):

    hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \\
        open_clip_config.json open_clip_pytorch_model.bin tokenizer.json \\
        tokenizer_config.json special_tokens_map.json vocab.txt --local-dir biomedclip
    hf download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract config.json \\
        --local-dir biomedclip/text

    biomedclip/
        open_clip_config.json
        open_clip_pytorch_model.bin      (or open_clip_model.safetensors)
        tokenizer.json  tokenizer_config.json  special_tokens_map.json  vocab.txt
        text/config.json                 (BiomedBERT's config.json; may also sit beside
                                          open_clip_config.json as config.json)

Weights are only loaded as safetensors or as a plain tensor pickle
(`torch.load(weights_only=True)`); a checkpoint that would run code is refused.
`--model tiny-random` runs everything without weights, with an untrained model whose
results mean nothing.
"""


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: `requested`, or CUDA, then Apple MPS, then CPU.

    Parameters
    ----------
    requested
        ``None`` or ``"auto"`` to choose, or a torch device string (``"cpu"``, ``"cuda:1"``...).

    Raises
    ------
    ModelError
        If the requested device does not exist or is not available in this torch build.
    """
    from ._torch_env import preload_triton

    preload_triton()  # before torch, also in napari's process (see _torch_env)
    import torch

    if requested is None or requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(
            f"Unknown device {requested!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from exc
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (device.index or 0) >= n:
            raise ModelError(
                f"Device {requested!r} is not available: this torch build sees {n} CUDA device(s) "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use 'cpu'."
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ModelError(f"Device {requested!r} is not available on this machine; use 'cpu'.")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise ModelError(f"Device {requested!r} is not available on this machine; use 'cpu'.")
    return device


def resolve_backend(
    backend: str | None = "auto", device: str | None = None, *, compile: bool = False
) -> tuple[torch.device, str]:
    """The (device, backend) a `load_encoder` call runs the image tower on.

    ``"auto"`` picks OpenVINO on a CPU where OpenVINO reports native bf16 (AVX512-BF16 or AMX),
    else torch (on CUDA, MPS, and on CPUs without bf16, where OpenVINO fp32 measured 1.3x to
    1.5x torch on a 2-core AVX2 CPU: ``benchmarks/bench_backends.py``; ask for it with
    ``"openvino"``). ``"openvino"`` runs on the CPU only.

    Raises
    ------
    ModelError
        Unknown backend; ``openvino`` with a GPU device or with `compile`; OpenVINO asked for
        but not installed (the message says how to install it).
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ModelError(f"Unknown backend {backend!r}: use {', '.join(BACKENDS)}.")
    if backend == "openvino":
        if device not in (None, "auto") and _device_type(device) != "cpu":
            raise ModelError(
                f"--backend openvino runs on the CPU, not on {device!r}: use --backend torch "
                f"(the default on GPUs) with --device {device}, or --device cpu."
            )
        if compile:
            raise ModelError("--compile is torch.compile: use it with --backend torch.")
        from ._openvino import require_openvino

        require_openvino()  # a clear error now, before the model loads
        return pick_device("cpu"), "openvino"
    dev = pick_device(device)
    if backend == "auto" and dev.type == "cpu" and not compile and _openvino_bf16():
        return dev, "openvino"
    return dev, "torch"


def _device_type(device: str) -> str:
    """The type of `device` ("cuda" for "cuda:1") without checking that it exists."""
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        return pick_device(device).type  # raises the usual "unknown device" error


def _openvino_bf16() -> bool:
    """OpenVINO is installed and reports native bf16 on this CPU."""
    from . import _openvino

    if not _openvino.available():
        return False
    return _openvino.choose_precision(_openvino.cpu_capabilities()) == "bf16"


def load_encoder(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    backend: str | None = "auto",
    compile: bool = False,
) -> Encoder:
    """Load a model for tiles and prompts: from the hub, the local cache, a folder, or in code.

    Parameters
    ----------
    name
        ``DEFAULT_MODEL`` (BiomedCLIP; also ``"biomedclip"`` or the bare hub id), another open_clip
        hub id, ``"local-dir:/path"`` or the path of a snapshot folder, an open_clip built-in
        with its weights tag (``"ViT-B-32:laion2b_s34b_b79k"``), or ``"tiny-random"``.
    device
        See `pick_device`; default: CUDA, MPS or CPU.
    backend
        What runs the image tower: ``"auto"`` (default), ``"torch"`` or ``"openvino"`` (CPU;
        the image graph is converted once and cached); see `resolve_backend`.
    compile
        ``torch.compile`` the image path (torch backend; worth it on GPUs for long runs).

    Raises
    ------
    WeightsNotFoundError
        The weights (or the text encoder's config, or the tokenizer) are neither cached nor
        downloadable; the message lists the ways to supply them.
    ModelError
        Unknown name, a folder that is not a model, a checkpoint that is not plain tensors, a
        backend that cannot run here.

    Examples
    --------
    >>> enc = load_encoder("tiny-random", device="cpu", backend="torch")
    >>> enc.trained, enc.label, enc.backend
    (False, 'tiny-random (UNTRAINED — not a result)', 'torch')
    """
    dev, chosen = resolve_backend(backend, device, compile=compile)
    encoder = _load_torch(name, dev)
    return _with_backend(encoder, chosen, compile=compile, asked=backend or "auto")


def _with_backend(
    encoder: Encoder, backend: str, *, compile: bool = False, asked: str = "auto"
) -> Encoder:
    """Put `encoder`'s image tower on `backend`. A model OpenVINO cannot convert is an error
    when OpenVINO was asked for, and a warning (torch is used) when `auto` chose it."""
    if backend == "openvino":
        from ._openvino import OpenVINOImages

        try:
            encoder.set_image_backend(OpenVINOImages(encoder))
        except Exception as exc:
            if asked == "openvino":
                if isinstance(exc, TilescopeError):
                    raise
                raise ModelError(
                    f"{encoder.model_id}: OpenVINO could not convert or compile the image tower "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "use --backend torch"
                ) from exc
            warnings.warn(
                f"{encoder.model_id}: OpenVINO could not take the image tower ({exc!r}); "
                "running it in torch",
                UserWarning,
                stacklevel=3,
            )
    elif compile:
        encoder.set_image_backend("torch", compile=True)
    return encoder


def _load_torch(name: str, dev: torch.device) -> Encoder:
    spec = files.parse_model_name(name)
    if spec.kind == "tiny":
        return _random_encoder("tiny", TINY_MODEL, dev)
    found = files.locate(spec)
    files.check_weights_file(found.weights, spec.model_id)
    digest = files.sha256_file(found.weights)
    try:
        import open_clip

        extra = {"text_cfg": found.text_cfg} if found.text_cfg else {}
        model, preprocess = open_clip.create_model_from_pretrained(
            found.open_clip_name,
            pretrained=found.pretrained,
            device=dev,
            weights_only=True,
            **extra,
            **found.create_kwargs,
        )
        tokenizer = _tokenizer(found)
    except TilescopeError:
        raise
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"Model {spec.model_id!r} could not be built from {found.weights}: {reason}"
        ) from exc
    return Encoder(
        model,
        tokenizer,
        preprocess,
        model_id=spec.model_id,
        weights_digest=digest,
        trained=True,
        embed_dim=found.model_cfg["embed_dim"],
        device=dev,
        source=found.weights.name,
    )


def _tokenizer(found: files.ModelFiles) -> Any:
    """open_clip's tokenizer, read from the folder `locate` found for it."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    folder = found.open_clip_name.removeprefix("local-dir:")
    if found.tokenizer_dir is None or found.tokenizer_dir == Path(folder):
        return open_clip.get_tokenizer(found.open_clip_name)  # as `local-dir:` / built-ins do
    text_cfg = found.model_cfg["text_cfg"]
    return HFTokenizer(  # what get_tokenizer builds, pointed at the local folder
        str(found.tokenizer_dir),
        context_length=text_cfg.get("context_length", 77),
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **(text_cfg.get("tokenizer_kwargs") or {}),
    )


def _random_encoder(kind: str, model_id: str, device: torch.device) -> Encoder:
    from open_clip.tokenizer import HFTokenizer

    from . import _tiny_model

    with tempfile.TemporaryDirectory(prefix="tilescope-") as tmp:
        bert = _tiny_model.TINY_BERT if kind == "tiny" else _tiny_model.BERT_BASE
        _tiny_model.write_text_files(tmp, bert)
        cfg = _tiny_model.model_cfg(kind, tmp)
        model, preprocess = _tiny_model.build_random(cfg, seed=0)
        tokenizer = HFTokenizer(tmp, context_length=cfg["text_cfg"]["context_length"])
    return Encoder(
        model,
        tokenizer,
        preprocess,
        model_id=model_id,
        weights_digest=_tiny_model.state_dict_digest(model),
        trained=False,
        embed_dim=cfg["embed_dim"],
        device=device,
        source="random (seed 0)",
    )


def build_biomedclip_architecture(
    random_weights: bool = True,
    *,
    device: str | None = None,
    backend: str | None = "torch",
    compile: bool = False,
) -> Encoder:
    """BiomedCLIP's full-size architecture (ViT-B/16 + BERT-base, 512-d), for timing.

    With ``random_weights=True`` (the default) the weights are random and seeded, nothing is
    downloaded, and the encoder is labelled untrained. ``False`` loads the real model
    (`DEFAULT_MODEL`, same as ``load_encoder()``). `backend`: as in `load_encoder`.
    """
    if not random_weights:
        return load_encoder(DEFAULT_MODEL, device=device, backend=backend, compile=compile)
    dev, chosen = resolve_backend(backend, device, compile=compile)
    encoder = _random_encoder("biomedclip", "biomedclip-architecture-random", dev)
    return _with_backend(encoder, chosen, compile=compile, asked=backend or "auto")


def load_encoder_for_store(
    store_model: dict[str, Any],
    *,
    name: str | None = None,
    device: str | None = None,
    backend: str | None = "torch",
) -> Encoder:
    """The model that embedded a store, so that prompts and queries match its embeddings.

    `store_model` is the store signature's ``model`` entry. `name` overrides where to load it
    from (another folder holding the same weights, say); the weights must be the same.
    `backend` defaults to torch: scoring runs the text tower only.
    """
    model_id = str(store_model.get("model_id", "?"))
    enc = load_encoder(name or model_id, device=device, backend=backend)
    want = store_model.get("weights_digest")
    if want and enc.weights_digest != want:
        raise ModelError(
            f"The store was embedded with {model_id!r} (weights sha256 {str(want)[:12]}...), but "
            f"{enc.model_id!r} has weights {enc.weights_digest[:12]}...: text and image "
            "embeddings of different models cannot be compared. Load the store's model "
            "(--model) or embed the slide again with this one."
        )
    return enc
