"""On-disk cache of SAM image embeddings, so re-running a SAM method skips the image encoder.

The encoder dominates SAM's cost (the prompt decoder is cheap), and pseudo-labelling passes
revisit the same images with different prompts or thresholds. An embedding is keyed by what
determines it: the exact preprocessed encoder input (its bytes, dtype and shape), the model name
and the checkpoint's content hash. Any change of image, resizing, normalisation or weights gives a
new key, so a stale embedding is never returned.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from wsss_domains.data.io import atomic_write

log = logging.getLogger(__name__)

KEY_VERSION = b"wsss-sam-embedding/1"


# The one environment variable naming the embedding cache folder (methods and library alike).
CACHE_ENV = "WSSS_SAM_CACHE"


def default_cache_dir() -> Path:
    """``$WSSS_SAM_CACHE``, else ``$XDG_CACHE_HOME/wsss-domains/sam-embeddings`` (``~/.cache`` by default)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "wsss-domains" / "sam-embeddings"


def embedding_key(model_name: str, checkpoint_id: str, model_input: Tensor) -> str:
    """Hex key from the model identity and the preprocessed input tensor's content."""
    data = model_input.detach().to("cpu").contiguous()
    digest = hashlib.sha256(KEY_VERSION)
    for part in (model_name, checkpoint_id, str(data.dtype), repr(tuple(data.shape))):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return digest.hexdigest()


class EmbeddingCache:
    """Embeddings stored as ``root/<model name>/<key[:2]>/<key>.pt``, written atomically.

    ``dtype`` is the storage type: ``torch.float16`` halves the disk use (an embedding of a
    64x64x256 SAM is 4 MiB in float32) at the cost of exact reproducibility.
    """

    def __init__(self, root: str | Path | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def path(self, model_name: str, key: str) -> Path:
        return self.root / model_name / key[:2] / f"{key}.pt"

    def load(self, model_name: str, key: str) -> Tensor | None:
        """The stored embedding, or None when absent or unreadable (a broken file is recomputed)."""
        path = self.path(model_name, key)
        if not path.is_file():
            return None
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
            if record.get("key") != key:
                raise ValueError("stored key does not match the file name")
            return record["embedding"]
        except Exception as exc:  # truncated by a full disk, edited by hand, ...: recompute
            log.warning("ignoring unreadable SAM embedding %s (%s)", path, exc)
            return None

    def store(self, model_name: str, key: str, embedding: Tensor) -> None:
        record = {"key": key, "embedding": embedding.detach().to("cpu", self.dtype).contiguous()}
        atomic_write(self.path(model_name, key), lambda tmp: torch.save(record, tmp))

    def get_or_compute(
        self,
        model_name: str,
        checkpoint_id: str,
        model_input: Tensor,
        encode: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """``encode(model_input)``, read from disk when this exact input was encoded before."""
        key = embedding_key(model_name, checkpoint_id, model_input)
        cached = self.load(model_name, key)
        if cached is not None:
            self.hits += 1
            return cached.to(model_input.device, torch.float32)
        self.misses += 1
        embedding = encode(model_input)
        self.store(model_name, key, embedding)
        return embedding
