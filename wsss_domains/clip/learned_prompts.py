"""Learned prompts for a domain: CoOp context vectors, learnable background prompts, optional LoRA.

Hand-written templates transfer poorly to aerial, street or tissue imagery, so a domain can learn
its prompt from image-level labels while CLIP stays frozen:

* a shared context ``[X]_1..[X]_n`` replaces the template words in front of every class name
  (CoOp, Zhou et al. 2022), initialised from ``"a photo of a"`` by default;
* each background word of the domain's vocabulary becomes a learnable prompt whose word token
  embeddings are free parameters (learnable background prompts as in SemPLoS/POLE), so the
  background classes CLIP-ES competes against adapt to the domain;
* optionally, LoRA adapters (``peft``) on the MLP linear layers of the text and image towers.

Only the MLP linears take LoRA: open_clip's attention is ``nn.MultiheadAttention``, whose
projections are not called as modules, and peft's LoRA for it merges and unmerges the delta into
the frozen weight on every forward, which perturbs the frozen weights by rounding (measured
~1e-8 after three forwards) and would break the unchanged-checksum guarantee.

The training loss matches how CLIP-ES uses the prompts: for each class, the softmax of its logit
against the background prompts' logits is the probability that the class is present, scored with
binary cross-entropy against the image-level label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from wsss_domains.clip.text import TextTower, class_texts
from wsss_domains.clip.vit import image_embedding, prepare_pixels, vision_transformer
from wsss_domains.domains.contract import ClipPrompts

DEFAULT_CTX_INIT = "a photo of a"
LORA_TARGETS = {
    "text": r"(text\.)?transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)",
    "image": r"visual\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)",
}


def _eot_index(tokens: Tensor, tokenizer: Any) -> Tensor:
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None:
        return tokens.argmax(dim=-1)
    hits = tokens == eot
    if not bool(hits.any(dim=-1).all()):
        raise ValueError("a prompt is longer than the text tower's context length")
    return hits.int().argmax(dim=-1)


class PromptLearner(nn.Module):
    """Context vectors and background prompt embeddings for one domain's classes.

    The CLIP model is held by reference, not as a submodule, so ``state_dict()`` holds exactly the
    learned tensors; LoRA adapters, when used, live in the CLIP model itself.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[..., Tensor],
        classes: Mapping[str, str],
        background_words: Sequence[str],
        ctx_init: str | None = DEFAULT_CTX_INIT,
        n_ctx: int = 4,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("learned prompts need at least one class")
        if not background_words:
            raise ValueError("learned prompts need a background vocabulary to learn background prompts from")
        object.__setattr__(self, "clip", model)
        self.tokenizer = tokenizer
        self.tower = TextTower.of(model)
        self.class_texts = dict(classes)
        self.background_words = list(background_words)
        self.ctx_init = ctx_init
        device = self.tower.token_embedding.weight.device
        embed = self.tower.token_embedding
        with torch.no_grad():
            if ctx_init:
                init_tokens = tokenizer([ctx_init]).to(device)
                n_ctx = int(_eot_index(init_tokens, tokenizer)[0]) - 1
                ctx = embed(init_tokens[0, 1 : 1 + n_ctx]).float()
            else:
                gen = torch.Generator().manual_seed(0)
                ctx = torch.randn(n_ctx, embed.embedding_dim, generator=gen).mul_(0.02).to(device)
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.clone())
        placeholder = " ".join(["X"] * n_ctx)
        class_tokens = tokenizer([f"{placeholder} {t}." for t in classes.values()]).to(device)
        x_token = int(tokenizer(["X"])[0, 1])
        if not bool((class_tokens[:, 1 : 1 + n_ctx] == x_token).all()):
            raise ValueError("the tokenizer does not encode each context placeholder as one token")
        self.register_buffer("class_tokens", class_tokens, False)
        bg_tokens = tokenizer([f"{placeholder} {w}." for w in self.background_words]).to(device)
        self.register_buffer("background_tokens", bg_tokens, False)
        dot = int(tokenizer(["."])[0, 1])
        eots = _eot_index(bg_tokens, tokenizer)
        self.background_spans: list[tuple[int, int]] = []
        words = []
        for i, word in enumerate(self.background_words):
            start, end = 1 + n_ctx, int(eots[i]) - 1
            if end <= start or int(bg_tokens[i, end]) != dot:
                raise ValueError(f"could not locate the tokens of background word {word!r} in its prompt")
            self.background_spans.append((start, end))
            with torch.no_grad():
                words.append(nn.Parameter(embed(bg_tokens[i, start:end]).float().clone()))
        self.background_embeddings = nn.ParameterList(words)
        self._class_index = {name: i for i, name in enumerate(self.class_texts)}

    def _with_context(self, tokens: Tensor) -> Tensor:
        emb = self.tower.embed_tokens(tokens)
        ctx = self.ctx.to(emb.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)

    def foreground(self, class_names: Sequence[str] | None = None) -> Tensor:
        """Normalised embeddings of ``class_names`` (all learned classes by default), in that order."""
        names = list(self.class_texts) if class_names is None else list(class_names)
        missing = [n for n in names if n not in self._class_index]
        if missing:
            raise KeyError(
                f"learned prompts have no class {', '.join(missing)}; known: {', '.join(self.class_texts)}"
            )
        tokens = self.class_tokens[[self._class_index[n] for n in names]]
        return F.normalize(self.tower.encode(self._with_context(tokens), tokens).float(), dim=-1)

    def background(self) -> Tensor:
        """Normalised embeddings of the learned background prompts."""
        tokens = self.background_tokens
        emb = self._with_context(tokens)
        rows = [
            torch.cat([emb[i, :start], self.background_embeddings[i].to(emb.dtype), emb[i, end:]])
            for i, (start, end) in enumerate(self.background_spans)
        ]
        return F.normalize(self.tower.encode(torch.stack(rows), tokens).float(), dim=-1)

    def image_features(self, pixels: Tensor) -> Tensor:
        """Normalised CLIP-ES (patch-mean) image embeddings of normalised ``pixels``."""
        return F.normalize(image_embedding(vision_transformer(self.clip), pixels).float(), dim=-1)

    def similarity_logits(self, pixels: Tensor) -> Tensor:
        """Scaled cosine similarities ``B x (C + J)``: learned classes, then background prompts."""
        text = torch.cat([self.foreground(), self.background()])
        return self.clip.logit_scale.exp().float() * self.image_features(pixels) @ text.T


def class_vs_background_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """BCE of each class's softmax probability against the background prompts (``logits`` as above)."""
    num_classes = labels.shape[1]
    fg, bg = logits[:, :num_classes], logits[:, num_classes:]
    lse_bg = torch.logsumexp(bg, dim=1, keepdim=True)
    lse_all = torch.logaddexp(fg, lse_bg)
    log_p, log_not_p = fg - lse_all, lse_bg - lse_all
    return -(labels * log_p + (1 - labels) * log_not_p).mean()


def freeze(model: nn.Module) -> None:
    """Freeze every CLIP parameter except LoRA adapter weights."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def add_lora(
    model: nn.Module, rank: int = 4, alpha: float = 8.0, towers: Sequence[str] = ("text", "image")
) -> Any:
    """Inject peft LoRA adapters into the MLP linears of ``towers``, in place; returns the LoraConfig."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = set(towers) - set(LORA_TARGETS)
    if unknown or not towers:
        raise ValueError(f"LoRA towers must be among {sorted(LORA_TARGETS)}, got {list(towers)}")
    if getattr(model, "peft_config", None):
        raise ValueError("this CLIP model already carries LoRA adapters; start from a freshly loaded model")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules="|".join(f"(?:{LORA_TARGETS[t]})" for t in towers),
    )
    inject_adapter_in_model(config, model)
    freeze(model)
    return config


@dataclass
class PromptTrainConfig:
    """How prompts are learned.

    ``ctx_init`` words initialise the context (their token count sets n_ctx); with ``ctx_init=None``
    ``n_ctx`` random vectors are used, as in CoOp. ``image_size`` None uses the model's input size.
    """

    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    ctx_init: str | None = DEFAULT_CTX_INIT
    n_ctx: int = 4
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_towers: tuple[str, ...] = ("text", "image")
    image_size: int | None = None
    seed: int = 0


@dataclass
class TrainResult:
    learner: PromptLearner
    epoch_losses: list[float] = field(default_factory=list)
    lora_config: Any = None


def _loader(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int,
    image_size: int | None,
    transform: Callable[[Tensor], Tensor] | None,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    visual = vision_transformer(model)
    size = (image_size, image_size) if image_size else tuple(visual.image_size)

    def collate(samples: list[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        pixels, labels = [], []
        for sample in samples:
            label = torch.as_tensor(sample["label"]).float().flatten()
            if label.numel() != num_classes:
                raise ValueError(
                    f"sample {sample.get('id')!r} has {label.numel()} labels for {num_classes} prompted classes"
                )
            image = transform(sample["image"]) if transform else sample["image"]
            pixels.append(prepare_pixels(model, image, size))
            labels.append(label)
        return torch.cat(pixels), torch.stack(labels).to(pixels[0].device)

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=gen)


@torch.no_grad()
def dataset_loss(
    learner: PromptLearner,
    dataset: Dataset,
    batch_size: int = 16,
    image_size: int | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Mean class-vs-background loss of ``learner`` over ``dataset``."""
    loader = _loader(
        learner.clip, dataset, len(learner.class_texts), batch_size, image_size, transform, False, 0
    )
    total, count = 0.0, 0
    for pixels, labels in loader:
        total += float(class_vs_background_loss(learner.similarity_logits(pixels), labels)) * len(labels)
        count += len(labels)
    return total / max(count, 1)


def train_prompts(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    dataset: Dataset,
    prompts: ClipPrompts,
    config: PromptTrainConfig | None = None,
    *,
    class_order: Sequence[str] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Learn prompts from a dataset of :class:`~wsss_domains.domains.contract.Sample` dicts.

    ``label`` vectors index ``class_order`` (default: the order of ``prompts.class_names``, which
    for a domain's :meth:`clip_prompts` is its label space's foreground order). ``transform`` maps
    a ``3xHxW`` [0, 1] image before CLIP normalisation (e.g. a domain's ``preprocess``). Only the
    context, background prompts and (with ``config.lora``) LoRA weights change.
    """
    config = config or PromptTrainConfig()
    classes = class_texts(prompts, class_order)
    vision_transformer(model)
    model.eval()
    freeze(model)
    lora_config = (
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_towers) if config.lora else None
    )
    learner = PromptLearner(model, tokenizer, classes, prompts.background, config.ctx_init, config.n_ctx)
    params = list(learner.parameters()) + [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    loader = _loader(
        model, dataset, len(classes), config.batch_size, config.image_size, transform, True, config.seed
    )
    result = TrainResult(learner=learner, lora_config=lora_config)
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        for pixels, labels in loader:
            loss = class_vs_background_loss(learner.similarity_logits(pixels), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
        result.epoch_losses.append(total / max(count, 1))
        if progress is not None:
            progress(epoch, result.epoch_losses[-1])
    return result
