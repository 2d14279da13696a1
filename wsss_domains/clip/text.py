"""Text-side features for CLIP methods: prompt templates over class names, and the text tower run on
token embeddings (what learned context vectors need).

Synonyms follow CLIP-ES: its class names such as ``"person with clothes,people,human"`` put every
synonym into one prompt, so the default ``synonyms="join"`` joins a class's names with commas;
``"average"`` instead embeds each synonym separately and averages, like template ensembling.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_domains.clip.loading import ClipUnsupported
from wsss_domains.domains.contract import ClipPrompts

SynonymMode = Literal["join", "average"]


class TextFeatureSource(Protocol):
    """Anything that yields L2-normalised text embeddings for classes and for the background."""

    def foreground(self, class_names: Sequence[str]) -> Tensor: ...

    def background(self) -> Tensor: ...


def class_prompt_texts(names: Sequence[str], templates: Sequence[str], synonyms: SynonymMode) -> list[str]:
    """Every prompt whose embeddings are averaged into one class embedding."""
    if not names:
        raise ValueError("a class needs at least one name")
    if synonyms == "join":
        words = [",".join(names)]
    elif synonyms == "average":
        words = list(names)
    else:
        raise ValueError(f"synonyms must be 'join' or 'average', got {synonyms!r}")
    return [template.format(word) for word in words for template in templates]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ensemble_features(model: nn.Module, tokenizer: Callable[..., Tensor], texts: Sequence[str]) -> Tensor:
    """CLIP-ES's zero-shot classifier row: normalise each prompt embedding, average, normalise."""
    tokens = tokenizer(list(texts)).to(_device(model))
    feats = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return F.normalize(feats.mean(dim=0), dim=-1)


class ZeroShotText:
    """Text features from a domain's :class:`ClipPrompts`, cached per class across images."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        prompts: ClipPrompts,
        synonyms: SynonymMode = "join",
    ) -> None:
        self.model, self.tokenizer, self.prompts, self.synonyms = model, tokenizer, prompts, synonyms
        self._cache: dict[str, Tensor] = {}
        self._background: Tensor | None = None

    def _class(self, name: str) -> Tensor:
        if name not in self._cache:
            if name not in self.prompts.class_names:
                known = ", ".join(self.prompts.class_names)
                raise KeyError(f"class '{name}' has no CLIP prompt; prompted classes: {known}")
            texts = class_prompt_texts(
                list(self.prompts.class_names[name]), self.prompts.templates, self.synonyms
            )
            self._cache[name] = ensemble_features(self.model, self.tokenizer, texts)
        return self._cache[name]

    def foreground(self, class_names: Sequence[str]) -> Tensor:
        if not class_names:
            return torch.zeros(0, 0, device=_device(self.model))
        return torch.stack([self._class(n) for n in class_names])

    def background(self) -> Tensor:
        """One embedding per background word (CLIP-ES keeps them as separate softmax entries)."""
        if self._background is None:
            rows = [
                ensemble_features(
                    self.model, self.tokenizer, [t.format(word) for t in self.prompts.templates]
                )
                for word in self.prompts.background
            ]
            self._background = torch.stack(rows) if rows else torch.zeros(0, 0, device=_device(self.model))
        return self._background


class FrozenText:
    """The features of a text source whose parameters no longer change (learned prompts at
    pseudo-label time), computed once per class and once for the background, then reused.

    A learned-prompt module runs the text tower on every call; over a split that is one text-tower
    pass per image (benchmarks/results/clip_methods_speed.md). Each class's prompt is encoded on its
    own by the tower, so per-class caching gives the features a fresh call would.
    """

    def __init__(self, source: TextFeatureSource) -> None:
        self.source = source
        self._classes: dict[str, Tensor] = {}
        self._background: Tensor | None = None

    def foreground(self, class_names: Sequence[str]) -> Tensor:
        missing = [name for name in dict.fromkeys(class_names) if name not in self._classes]
        if missing:
            with torch.no_grad():
                self._classes.update(zip(missing, self.source.foreground(missing), strict=True))
        return torch.stack([self._classes[name] for name in class_names])

    def background(self) -> Tensor:
        if self._background is None:
            with torch.no_grad():
                self._background = self.source.background()
        return self._background


@dataclass(frozen=True)
class TextTower:
    """The pieces of an open_clip text transformer needed to encode from token embeddings."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    attn_mask: Tensor | None
    ln_final: nn.Module
    text_projection: Any
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: nn.Module) -> TextTower:
        """Read the tower from a ``CLIP`` or a ``CustomTextCLIP`` with a native text transformer."""
        from open_clip.transformer import TextTransformer

        if isinstance(getattr(model, "text", None), TextTransformer):
            text = model.text
            if text.cls_emb is not None or getattr(text, "use_pad_mask", False):
                raise ClipUnsupported(
                    "learned prompts do not support text towers with a class token or pad mask"
                )
            return cls(
                text.token_embedding,
                text.positional_embedding,
                text.transformer,
                text.attn_mask,
                text.ln_final,
                text.text_projection,
                text.pool_type,
                getattr(text, "eos_id", None),
            )
        if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
            return cls(
                model.token_embedding,
                model.positional_embedding,
                model.transformer,
                model.attn_mask,
                model.ln_final,
                model.text_projection,
                model.text_pool_type,
                getattr(model, "text_eos_id", None),
            )
        raise ClipUnsupported(
            f"learned prompts need an open_clip native text tower, got {type(model).__name__}"
        )

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.token_embedding(tokens)

    def encode(self, embeddings: Tensor, tokens: Tensor) -> Tensor:
        """Text embedding from token embeddings (``P x L x D``); ``tokens`` only locate the pooled token."""
        from open_clip.transformer import text_global_pool

        dtype = self.transformer.get_cast_dtype()
        x = embeddings.to(dtype) + self.positional_embedding[: embeddings.shape[1]].to(dtype)
        mask = self.attn_mask
        if mask is not None:
            mask = mask[: x.shape[1], : x.shape[1]]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is None:
            return x
        return (
            self.text_projection(x)
            if isinstance(self.text_projection, nn.Linear)
            else x @ self.text_projection
        )


def class_texts(prompts: ClipPrompts, names: Sequence[str] | None = None) -> Mapping[str, str]:
    """One CLIP-ES style name string per class (synonyms joined), e.g. for learned prompts."""
    names = list(prompts.class_names) if names is None else list(names)
    missing = [n for n in names if n not in prompts.class_names]
    if missing:
        raise KeyError(f"classes without CLIP prompt: {', '.join(missing)}")
    return {n: ",".join(prompts.class_names[n]) for n in names}
