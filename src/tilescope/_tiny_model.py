"""Random-weight models of the BiomedCLIP family, built offline and deterministically.

BiomedCLIP is an open_clip ``CustomTextCLIP``: a timm ViT image tower and a Hugging Face BERT
text tower. The models here have the same structure, configured in code:

- ``tiny``: timm's ``test_vit`` (64 wide, 6 blocks, patch 16, run at 224 px) and a 2-layer,
  64-wide BERT with a ~150-token WordPiece vocabulary, 64-d embeddings, context 256.
  Builds in well under a second; used by the tests and by ``--model tiny-random``.
- ``biomedclip``: the real sizes (``vit_base_patch16_224`` + BERT-base, 512-d), random
  weights, for timing only.

Nothing is downloaded: the BERT config and vocabulary are written to a folder first because
open_clip builds the text tower from a config path (``text_cfg.hf_model_name``). Weights come
from ``torch.manual_seed(seed)`` inside a forked RNG, so every process builds the same model.
Also writes random snapshots in the file layout of the BiomedCLIP hub repository, for tests.
"""

from __future__ import annotations

import copy
import hashlib
import json
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: The BERT repository named in BiomedCLIP's ``open_clip_config.json`` (its config only is used).
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

#: BiomedCLIP's ``preprocess_cfg`` (the OpenAI CLIP statistics).
BIOMEDCLIP_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}

_SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = (
    "a an and of the in with or no not normal tissue tumor tumour cancer carcinoma invasive "
    "adenocarcinoma epithelium stroma lymphocytes lymphocyte necrosis debris mucus muscle fat "
    "adipose mucosa colon cell cells gland glands nuclei nucleus photo image histopathology "
    "h&e stain slide benign malignant region inflammation blood vessel background"
).split()

#: The tiny BERT text tower (real BERT code, toy sizes).
TINY_BERT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}

#: BERT-base, as in BiomedBERT (``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``).
BERT_BASE = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}


def tiny_vocab() -> list[str]:
    """The tiny WordPiece vocabulary: specials, characters, ``##`` continuations, some words."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    return _SPECIALS + list(chars) + ["##" + c for c in chars] + _WORDS


def write_text_files(folder: str | Path, bert: dict[str, Any] | None = None) -> Path:
    """Write a BERT ``config.json`` and a WordPiece tokenizer (``vocab.txt`` + config) to `folder`.

    Parameters
    ----------
    folder
        Target folder (created if needed).
    bert
        BERT config values; default `TINY_BERT`. ``vocab_size`` defaults to the tiny vocabulary.

    Returns
    -------
    Path
        `folder`, loadable with ``AutoConfig`` / ``AutoTokenizer.from_pretrained``.
    """
    from transformers import BertConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    values = {"vocab_size": len(vocab), "pad_token_id": 0, **(bert or TINY_BERT)}
    BertConfig(**values).to_json_file(str(folder / "config.json"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    tok_cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    return folder


def model_cfg(kind: str, text_dir: str | Path) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the ``"tiny"`` or ``"biomedclip"`` architecture.

    The layout is BiomedCLIP's ``open_clip_config.json``; `text_dir` is the folder (or hub id)
    named in ``text_cfg.hf_model_name`` / ``hf_tokenizer_name``.
    """
    if kind not in ("tiny", "biomedclip"):
        raise ValueError(f"unknown random architecture {kind!r}; use 'tiny' or 'biomedclip'")
    tiny = kind == "tiny"
    return {
        "embed_dim": 64 if tiny else 512,
        "vision_cfg": {
            "timm_model_name": "test_vit" if tiny else "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    }


def build_random(cfg: dict[str, Any], *, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Build an open_clip model with seeded random weights, and its eval transform.

    Mirrors what ``open_clip.create_model`` does for a config without weights (no pretrained
    towers, preprocess config attached to ``model.visual``) without its logging side effects.
    `cfg` is a ``model_cfg`` whose ``hf_model_name`` is a local folder.

    Returns
    -------
    (model, preprocess)
        The model in eval mode on CPU and open_clip's inference transform for PIL images.
    """
    import torch
    from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = copy.deepcopy(cfg)
    cfg["vision_cfg"]["timm_model_pretrained"] = False
    cfg["text_cfg"]["hf_model_pretrained"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CustomTextCLIP(**cfg)
    preprocess_cfg = {**PreprocessCfg().__dict__, **BIOMEDCLIP_PREPROCESS}
    preprocess_cfg["size"] = model.visual.image_size
    set_model_preprocess_cfg(model, preprocess_cfg)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model.eval(), preprocess


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's tensors (names, dtypes, shapes and bytes, in key order)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_snapshot(
    folder: str | Path,
    *,
    text_model: str = BIOMEDBERT,
    weights: str = "open_clip_pytorch_model.bin",
    seed: int = 0,
) -> Path:
    """Write a tiny random model in the file layout of the BiomedCLIP hub repository.

    Files: ``open_clip_config.json`` (BiomedCLIP's layout, tiny sizes, ``hf_model_name`` and
    ``hf_tokenizer_name`` = `text_model`), the weights file `weights` (``.bin`` saved with
    ``torch.save``, or ``.safetensors``; empty string for none), and the tokenizer files
    ``vocab.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``. The BERT
    ``config.json`` is NOT written here (in the real repo it lives in `text_model`'s repo):
    put it where the test needs it with `write_text_files`.
    """
    import tempfile

    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_text_files(tmp)
        model, _ = build_random(model_cfg("tiny", tmp), seed=seed)
    cfg = model_cfg("tiny", text_model)
    config = {"model_cfg": cfg, "preprocess_cfg": BIOMEDCLIP_PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_text_files(folder)
    (folder / "config.json").unlink()  # the BiomedCLIP repo has no BERT config of its own
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(folder / weights))
    elif weights:
        torch.save(state, folder / weights)
    return folder
