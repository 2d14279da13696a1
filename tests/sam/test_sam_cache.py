"""Embedding cache: hits and misses, key sensitivity, broken files, and use through the predictor."""

from __future__ import annotations

import torch

from wsss_domains.sam.cache import EmbeddingCache, embedding_key
from wsss_domains.sam.predictor import CachedSamPredictor


class CountingEncoder:
    def __init__(self, encoder):
        self.encoder = encoder
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return self.encoder(x)


def test_key_depends_on_content_model_and_checkpoint():
    x = torch.rand(1, 3, 8, 8)
    base = embedding_key("vit_b", "abc", x)
    assert base == embedding_key("vit_b", "abc", x.clone())
    y = x.clone()
    y[0, 1, 2, 3] += 1e-6
    assert embedding_key("vit_b", "abc", y) != base
    assert embedding_key("vit_l", "abc", x) != base
    assert embedding_key("vit_b", "abd", x) != base
    assert embedding_key("vit_b", "abc", x.reshape(1, 3, 4, 16)) != base
    assert embedding_key("vit_b", "abc", x.double()) != base


def test_miss_then_hit_returns_the_same_embedding(tmp_path):
    cache = EmbeddingCache(tmp_path)
    encode = CountingEncoder(lambda x: x.mean(dim=1, keepdim=True) * 3)
    x = torch.rand(1, 3, 16, 16)
    first = cache.get_or_compute("m", "ck", x, encode)
    second = cache.get_or_compute("m", "ck", x.clone(), encode)
    assert encode.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first, second)
    other = cache.get_or_compute("m", "ck2", x, encode)  # new weights: recomputed
    assert encode.calls == 2 and torch.equal(other, first)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 and all(name.endswith(".pt") for name in files)  # no temporary files left


def test_unreadable_entry_is_recomputed_and_rewritten(tmp_path):
    cache = EmbeddingCache(tmp_path)
    encode = CountingEncoder(lambda x: x + 1)
    x = torch.rand(1, 3, 4, 4)
    cache.get_or_compute("m", "ck", x, encode)
    path = cache.path("m", embedding_key("m", "ck", x))
    path.write_bytes(b"truncated")
    again = cache.get_or_compute("m", "ck", x, encode)
    assert encode.calls == 2 and torch.equal(again, x + 1)
    assert torch.equal(cache.load("m", embedding_key("m", "ck", x)), x + 1)


def test_half_precision_storage(tmp_path):
    cache = EmbeddingCache(tmp_path, dtype=torch.float16)
    x = torch.rand(1, 3, 4, 4)
    cache.get_or_compute("m", "ck", x, lambda t: t * 2)
    stored = cache.load("m", embedding_key("m", "ck", x))
    assert stored.dtype == torch.float16
    assert torch.allclose(cache.get_or_compute("m", "ck", x, lambda t: t), x * 2, atol=1e-3)


def test_predictor_reads_embeddings_from_the_cache(tiny_sam, tmp_path):
    cache = EmbeddingCache(tmp_path)
    predictor = CachedSamPredictor(tiny_sam, cache)
    image = torch.rand(3, 40, 72)
    first = predictor.set_image_tensor(image).clone()
    assert (cache.hits, cache.misses) == (0, 1)
    # A fresh predictor (as a re-run would build) finds the embedding on disk.
    rerun = CachedSamPredictor(tiny_sam, cache)
    tiny_sam.model.image_encoder.forward = None  # the encoder must not run on a hit
    assert torch.equal(rerun.set_image_tensor(image), first)
    assert (cache.hits, cache.misses) == (1, 1)
    assert rerun.input_size == (36, 64) and rerun.original_size == (40, 72)
