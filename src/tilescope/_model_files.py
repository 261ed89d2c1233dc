"""Find the files of an open_clip model: hub id, Hugging Face cache, local folder or built-in name.

Every source is resolved to local files *before* open_clip builds anything, so the only network
access is the explicit ``hf_hub_download`` calls here, cached files are used without any network
request, and the weights file that is hashed and checked is the one that is loaded. The text
tower's BERT config (``text_cfg.hf_model_name``) is resolved the same way and handed to
open_clip as a local folder, so it also works offline.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError, WeightsNotFoundError
from .offline import is_offline, offline_reason

TINY_NAME = "tiny-random"
DEFAULT_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
ALIASES = {"biomedclip": DEFAULT_REPO}
CONFIG_NAME = "open_clip_config.json"
TEXT_SUBFOLDER = "text"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", *_VOCAB_FILES)
# BiomedBERT was called PubMedBERT; older BiomedCLIP configs (and caches) use the old name.
_TEXT_ALIASES = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": (
        "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
    ),
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": (
        "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
    ),
}
_REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSpec:
    """What a model name asks for: ``kind`` is "tiny", "hub", "dir" or "builtin"."""

    kind: str
    model_id: str
    target: str
    tag: str | None = None


@dataclass(frozen=True)
class ModelFiles:
    """Local files of a model, ready for ``open_clip.create_model_from_pretrained``."""

    spec: ModelSpec
    open_clip_name: str
    pretrained: str | None
    model_cfg: dict[str, Any]
    weights: Path
    text_cfg: dict[str, Any] | None  # text_cfg override with a local hf_model_name, or None
    tokenizer_dir: Path | None  # None: open_clip.get_tokenizer(open_clip_name) as is
    #: more keyword arguments for ``create_model_from_pretrained`` (a built-in's preprocessing)
    create_kwargs: dict[str, Any] = field(default_factory=dict)


def weights_help(model_id: str) -> str:
    """The ways to supply weights, for error messages."""
    repo = model_id.removeprefix("hf-hub:")
    fetch = f" (or run `hf download {repo}`)" if _REPO_RE.fullmatch(repo) else ""
    return (
        "Ways to supply the weights:\n"
        f"  1. connect to the internet once and run again{fetch}: files are cached and "
        "used offline from then on (set HF_HUB_OFFLINE=1 or TILESCOPE_OFFLINE=1 to never touch "
        "the network);\n"
        "  2. point HF_HOME or HF_HUB_CACHE at a Hugging Face cache that holds the model "
        f"(now looking in {hub_settings()[0]});\n"
        "  3. pass a folder with a downloaded snapshot: --model /path/to/folder (see the README, "
        "'Using BiomedCLIP offline', for the files it needs);\n"
        "  4. for a demo without weights: --model tiny-random (untrained: results mean nothing)."
    )


def missing(model_id: str, what: str) -> WeightsNotFoundError:
    """A `WeightsNotFoundError` naming the model, what is missing and the ways to fix it."""
    return WeightsNotFoundError(f"Model {model_id!r}: {what}.\n{weights_help(model_id)}")


def hub_settings() -> tuple[str, bool]:
    """(hub cache folder, offline?) from the environment *now*, as huggingface_hub reads it."""
    from huggingface_hub import constants

    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache and (env.get("HF_HOME") or env.get("XDG_CACHE_HOME")):
        home = env.get("HF_HOME") or os.path.join(env["XDG_CACHE_HOME"], "huggingface")
        cache = os.path.join(home, "hub")
    cache = os.path.expanduser(os.path.expandvars(cache or constants.HF_HUB_CACHE))
    return cache, bool(constants.HF_HUB_OFFLINE or is_offline())


def offline_why() -> str:
    """What turned downloads off, for messages: ``TILESCOPE_OFFLINE=1``, ``HF_HUB_OFFLINE=1``."""
    return offline_reason() or "HF_HUB_OFFLINE"


def parse_model_name(name: str) -> ModelSpec:
    """Classify a model name; raises `ModelError` for names that cannot be a model."""
    import open_clip

    raw = str(name).strip()
    if raw.lower() == TINY_NAME:
        return ModelSpec("tiny", TINY_NAME, TINY_NAME)
    raw = ALIASES.get(raw.lower(), raw)
    if raw.startswith("local-dir:"):
        path = str(Path(raw.removeprefix("local-dir:")).expanduser().resolve())
        return ModelSpec("dir", f"local-dir:{path}", path)
    if raw.startswith("hf-hub:") or (_REPO_RE.fullmatch(raw) and not Path(raw).is_dir()):
        repo = raw.removeprefix("hf-hub:")
        if not _REPO_RE.fullmatch(repo):
            raise ModelError(f"{name!r} is not a Hugging Face hub id (expected 'org/name').")
        return ModelSpec("hub", f"hf-hub:{repo}", repo)
    if raw and Path(raw).expanduser().is_dir():
        path = str(Path(raw).expanduser().resolve())
        return ModelSpec("dir", f"local-dir:{path}", path)
    arch, _, tag = raw.partition(":")
    if arch in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag in tags:
            return ModelSpec("builtin", f"{arch}:{tag}", arch, tag)
        raise ModelError(
            f"Model {name!r}: name the weights as '{arch}:<tag>'; tags for {arch}: "
            f"{', '.join(tags) or 'none (open_clip has no weights for it)'}."
        )
    if raw.startswith(("/", "~", ".", "\\")) or re.match(r"[A-Za-z]:[\\/]", raw):
        raise ModelError(f"Model folder {raw!r} does not exist.")
    close = difflib.get_close_matches(raw, [*ALIASES, TINY_NAME, *open_clip.list_models()], n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelError(
        f"Unknown model {name!r}.{hint} Use 'biomedclip' (the default, {DEFAULT_REPO}), a hub id "
        "('org/name' or 'hf-hub:org/name'), a folder holding open_clip_config.json and weights "
        "('local-dir:/path' or just the path), an open_clip model with its weights tag "
        "('ViT-B-32:laion2b_s34b_b79k'), or 'tiny-random' (untrained, for demos and tests)."
    )


def locate(spec: ModelSpec) -> ModelFiles:
    """Resolve a hub, folder or built-in model to local files (downloading only if needed)."""
    hub = _Hub()
    if spec.kind == "dir":
        return _locate_dir(spec, hub)
    if spec.kind == "hub":
        return _locate_hub(spec, hub)
    if spec.kind == "builtin":
        return _locate_builtin(spec, hub)
    raise ModelError(f"Model {spec.model_id!r} has no files to locate.")


def _read_config(path: Path, model_id: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        cfg = config["model_cfg"]
        cfg["vision_cfg"], cfg["text_cfg"]  # noqa: B018 - presence check
        return cfg
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"Model {model_id!r}: {path} is not a valid open_clip config ({exc!r}); it needs "
            "'model_cfg' with 'embed_dim', 'vision_cfg' and 'text_cfg'."
        ) from exc


def _find_weights(folder: Path) -> Path | None:
    """The checkpoint open_clip itself picks from a folder (same order as ``local-dir:``)."""
    from open_clip import factory

    finder = getattr(factory, "_find_checkpoint_in_dir", None)
    if finder is not None:
        found = finder(folder)
        return Path(found) if found else None
    return next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)


def _locate_dir(spec: ModelSpec, hub: _Hub) -> ModelFiles:
    folder = Path(spec.target)
    if not folder.is_dir():
        raise ModelError(f"Model folder {str(folder)!r} does not exist.")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(
            f"Model folder {str(folder)!r} has no {CONFIG_NAME}: it is not an open_clip model "
            "snapshot. See the README, 'Using BiomedCLIP offline', for the files it needs."
        )
    cfg = _read_config(cfg_path, spec.model_id)
    weights = _find_weights(folder)
    if weights is None:
        raise missing(
            spec.model_id,
            f"the folder has {CONFIG_NAME} but no weights file ({' or '.join(WEIGHT_NAMES)})",
        )
    text_cfg = _text_override(cfg, folder, spec.model_id, hub)
    tok = _tokenizer_dir(cfg, spec.model_id, hub, local=[folder, folder / TEXT_SUBFOLDER])
    return ModelFiles(spec, f"local-dir:{folder}", None, cfg, weights, text_cfg, tok)


def _locate_hub(spec: ModelSpec, hub: _Hub) -> ModelFiles:
    repo = spec.target
    cfg_path, why = hub.file(repo, CONFIG_NAME)
    if cfg_path is None:
        if why == "no-repo":
            raise ModelError(
                f"Model {spec.model_id!r} is not on the Hugging Face hub (misspelt? private or "
                "gated repositories need `hf auth login`)."
            )
        if why == "no-file":
            raise ModelError(f"Model {spec.model_id!r} has no {CONFIG_NAME}: not open_clip's.")
        raise missing(spec.model_id, f"{CONFIG_NAME} is {why}")
    folder = cfg_path.parent
    cfg = _read_config(cfg_path, spec.model_id)
    for name in WEIGHT_NAMES:
        path, why = hub.file(repo, name)
        if path is not None:
            break
    weights = _find_weights(folder)
    if weights is None:
        why = "the repository has none" if why in ("no-file", "no-repo") else why
        what = f"{CONFIG_NAME} was found but not the weights ({' or '.join(WEIGHT_NAMES)}): {why}"
        raise missing(spec.model_id, what)
    text_cfg = _text_override(cfg, folder, spec.model_id, hub)
    name = cfg["text_cfg"].get("hf_tokenizer_name")
    repos = [*([name, *_TEXT_ALIASES.get(name, ())] if name else []), repo]
    tok = _tokenizer_dir(cfg, spec.model_id, hub, local=[folder], repos=repos, hub_first=True)
    return ModelFiles(spec, f"local-dir:{folder}", None, cfg, weights, text_cfg, tok)


def _locate_builtin(spec: ModelSpec, hub: _Hub) -> ModelFiles:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = open_clip.get_model_config(spec.target)
    pretrained_cfg = get_pretrained_cfg(spec.target, spec.tag or "")
    if hub.offline:  # open_clip would download what is not cached: look in the caches only
        weights = _cached_builtin_weights(spec, pretrained_cfg, hub)
    else:
        try:
            weights = Path(download_pretrained(pretrained_cfg))
        except Exception as exc:  # network or cache failure inside open_clip / huggingface_hub
            raise missing(spec.model_id, f"its weights could not be fetched ({exc})") from exc
    if not weights.is_file():
        raise missing(spec.model_id, "its weights file was not found")
    text_cfg = _text_override(cfg, None, spec.model_id, hub)
    tok = _tokenizer_dir(cfg, spec.model_id, hub, local=[])
    # open_clip is handed the file found here (given a tag, it would look it up, online, again),
    # with the preprocessing and activation the tag sets
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
            "resize_mode": "image_resize_mode"}  # fmt: skip
    kwargs = {arg: pretrained_cfg[k] for k, arg in keys.items() if pretrained_cfg.get(k)}
    if pretrained_cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    return ModelFiles(spec, spec.target, str(weights), cfg, weights, text_cfg, tok, kwargs)


def _cached_builtin_weights(spec: ModelSpec, pretrained_cfg: dict[str, Any], hub: _Hub) -> Path:
    """The weights of an open_clip built-in from the local caches only (offline), as
    ``open_clip.pretrained.download_pretrained`` would find them, without its download."""
    from open_clip.pretrained import _get_safe_alternatives

    if pretrained_cfg.get("file"):
        return Path(pretrained_cfg["file"])
    if pretrained_cfg.get("hf_hub"):
        repo, name = os.path.split(pretrained_cfg["hf_hub"])
        name = name or "open_clip_pytorch_model.bin"
        why = "not cached"
        for candidate in (*_get_safe_alternatives(name), name):
            path, why = hub.file(repo, candidate)
            if path is not None:
                return path
        raise missing(spec.model_id, f"its weights ({repo}/{name}) are {why}")
    url = str(pretrained_cfg.get("url", ""))
    path = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if url and path.is_file():
        return path
    raise missing(
        spec.model_id, f"its weights are not in open_clip's cache ({path}), and downloads are "
        f"off ({offline_why()})"
    )  # fmt: skip


class _Hub:
    """Lookups in the Hugging Face cache, then on the hub unless offline or found unreachable."""

    def __init__(self) -> None:
        self.cache, self.offline = hub_settings()
        self.unreachable = ""
        self.probed = False

    def file(self, repo: str, filename: str) -> tuple[Path | None, str]:
        """(path, "ok") or (None, why) with why "no-repo", "no-file" or a description."""
        path, why = self.lookup(repo, filename, online=False)
        if path is None and why == "not cached" and not self.offline and self.reachable():
            path, why = self.lookup(repo, filename, online=True)
        if why == "not cached":
            why = f"not in the Hugging Face cache ({self.cache}), and " + (
                f"downloads are off ({offline_why()})" if self.offline else self.unreachable
            )
        return path, why

    def reachable(self) -> bool:
        """Can the hub be reached? Probed once with a 3 s TCP connect, unless behind a proxy.

        Without it huggingface_hub retries an unreachable hub for ~25 s per file.
        """
        if self.probed or self.unreachable:
            return not self.unreachable
        self.probed = True
        proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY")
        if any(os.environ.get(p) for p in proxies):
            return True
        from urllib.parse import urlsplit

        from huggingface_hub import constants

        url = urlsplit(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
        port = url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((url.hostname or "huggingface.co", port), timeout=3).close()
        except OSError as exc:
            self.unreachable = f"{url.hostname} is unreachable ({exc.strerror or exc})"
        return not self.unreachable

    def lookup(self, repo: str, filename: str, *, online: bool) -> tuple[Path | None, str]:
        """One ``hf_hub_download`` attempt, cache-only unless `online`."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            path = hf_hub_download(
                repo, filename, cache_dir=self.cache, local_files_only=not online
            )
            return Path(path), "ok"
        except LocalEntryNotFoundError:
            if online:  # huggingface_hub could not reach the hub and fell back to the cache
                self.unreachable = "the hub is unreachable"
            return None, "not cached"
        except (RepositoryNotFoundError, HFValidationError):  # includes gated repositories
            return None, "no-repo"
        except (EntryNotFoundError, RevisionNotFoundError):
            return None, "no-file"
        except Exception as exc:  # no connection, proxy, timeout
            self.unreachable = f"the hub is unreachable ({type(exc).__name__})"
            return None, "not cached"

    def folder_with(self, repo: str, files: tuple[str, ...], need: tuple[str, ...]) -> Path | None:
        """Snapshot folder of `repo` holding those of `files` it has, if one of `need` is there."""
        found = {f: self.file(repo, f)[0] for f in files}
        hits = [p for f, p in found.items() if p is not None and f in need]
        return hits[0].parent if hits else None


def _has_text_config(folder: Path) -> bool:
    try:
        return "model_type" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _text_override(
    cfg: dict[str, Any], folder: Path | None, model_id: str, hub: _Hub
) -> dict[str, Any] | None:
    """``text_cfg`` with ``hf_model_name`` replaced by a local folder holding its config.json."""
    text_cfg = dict(cfg["text_cfg"])
    name = text_cfg.get("hf_model_name")
    if not name:
        return None
    for old, new in (("proj", "hf_proj_type"), ("pooler_type", "hf_pooler_type")):
        if old in text_cfg:  # keys of BiomedCLIP configs from before open_clip 2.23
            text_cfg.setdefault(new, text_cfg.pop(old))
    local = [Path(name).expanduser()]
    if folder is not None:
        local[:0] = [folder / TEXT_SUBFOLDER, folder]
    found = next((p for p in local if p.is_dir() and _has_text_config(p)), None)
    for repo in (name, *_TEXT_ALIASES.get(name, ())) if found is None else ():
        if _REPO_RE.fullmatch(repo) and (path := hub.file(repo, "config.json")[0]):
            found = path.parent
            break
    if found is None:
        where, dest = "", ""
        if folder is not None:
            where, dest = (
                f" nor {folder / TEXT_SUBFOLDER}",
                f" --local-dir {folder / TEXT_SUBFOLDER}",
            )
        raise missing(
            model_id,
            f"the config.json of its text encoder {name!r} is neither in the Hugging Face cache"
            f"{where} (`hf download {name} config.json{dest}` fetches it)",
        )
    text_cfg.update(hf_model_name=str(found), hf_model_pretrained=False)
    return text_cfg


def _tokenizer_dir(
    cfg: dict[str, Any],
    model_id: str,
    hub: _Hub,
    *,
    local: list[Path],
    repos: list[str] | None = None,
    hub_first: bool = False,
) -> Path | None:
    """Folder of the HF tokenizer named by ``hf_tokenizer_name``; None for open_clip's own."""
    name = cfg["text_cfg"].get("hf_tokenizer_name")
    if not name:
        return None
    if repos is None:
        repos = [name, *_TEXT_ALIASES.get(name, ())]
    local = [*local, Path(name).expanduser()]

    def from_local() -> Path | None:
        return next((p for p in local if any((p / f).is_file() for f in _VOCAB_FILES)), None)

    def from_hub() -> Path | None:
        for repo in filter(_REPO_RE.fullmatch, repos):
            if found := hub.folder_with(repo, (*_TOKENIZER_FILES, "config.json"), _VOCAB_FILES):
                return found
        return None

    for finder in (from_hub, from_local) if hub_first else (from_local, from_hub):
        if found := finder():
            return found
    raise missing(model_id, f"the files of its tokenizer {name!r} were not found")


def check_weights_file(path: Path, model_id: str) -> None:
    """Refuse weights that could run code: only safetensors or a ``weights_only`` torch pickle.

    open_clip loads with ``torch.load(weights_only=True)`` but falls back to a full unpickle on
    ``TypeError``; loading the file here first, strictly, proves that fallback is never reached.
    """
    import torch

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return
    if suffix not in (".bin", ".pth", ".pt"):
        raise ModelError(f"Model {model_id!r}: unsupported weights file {path.name}.")
    state: Any = None
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"Model {model_id!r}: refusing to load {path}: it is not a plain tensor checkpoint "
            f"(torch.load(weights_only=True) failed: {str(exc).splitlines()[0]}). Use a "
            "safetensors file or a state dict of tensors."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        raise ModelError(f"Model {model_id!r}: {path} does not hold a state dict of tensors.")


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, remembered by path, size, mtime and inode (`_hash_cache`)."""
    from ._hash_cache import sha256_cached

    return sha256_cached(path)
