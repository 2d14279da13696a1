"""CLIMS's training losses transcribed from the official code, shared by the CLIMS and POLE tests.

``step/train_clims.py``'s loop body, ``clip_utils.clip_forward`` and ``clip_loss.py`` (CVI-SZU/CLIMS;
Ruxie189/WSS_POLE keeps them), with OpenAI CLIP's normalisation in place of the data loader's ImageNet one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_pixels(image, mean, std):
    """The normalised batch back to pixels and into CLIP's normalisation."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pixels = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels - torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(OPENAI_DATASET_STD)[
        :, None, None
    ]


def official_clims_losses(clip, tokenizer, image, cams, label, pair_texts, background, threshold, mean, std):
    """The four unweighted losses and CBS's similarities; ``pair_texts`` is one text per present
    (image, class) pair in row-major order (CLIMS: the class's text; POLE: the chosen synonym)."""
    n, k = label.shape
    size = clip.visual.image_size[0]
    x = torch.sigmoid(cams)
    pixels = clip_pixels(image, mean, std)
    cam_224 = F.interpolate(x, (size, size), mode="bilinear", align_corners=True).reshape(
        n * k, 1, size, size
    )
    img_224 = F.interpolate(pixels, (size, size), mode="bilinear", align_corners=True)
    fg_indices = torch.nonzero(label.reshape(-1) == 1, as_tuple=False).squeeze()
    temp_idx = torch.nonzero(label == 1, as_tuple=False)
    fg_224_eval, bg_224_eval = [], []
    for j in range(temp_idx.shape[0]):
        fg_224_eval.append(cam_224[fg_indices[j]] * img_224[temp_idx[j, 0]])
        bg_224_eval.append((1 - cam_224[fg_indices[j]]) * img_224[temp_idx[j, 0]])
    fg_224_eval = torch.stack(fg_224_eval, dim=0)
    bg_224_eval = torch.stack(bg_224_eval, dim=0)

    def clip_forward(images, words):
        image_features = clip.encode_image(images)
        text_features = clip.encode_text(tokenizer(words))
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        m, c = image_features.size()
        return torch.matmul(image_features.reshape(m, 1, c), text_features.reshape(m, c, 1))

    l_otm = -(torch.log(clip_forward(fg_224_eval, pair_texts).clamp(0.0001, 0.9999)) * 1).mean()
    l_btm = -(torch.log(1 - clip_forward(bg_224_eval, pair_texts).clamp(0.0001, 0.9999)) * 1).mean()
    image_features = clip.encode_image(fg_224_eval)
    text_features = clip.encode_text(tokenizer(background))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    logits_per_image = image_features @ text_features.t()
    mask = torch.where(logits_per_image > threshold, torch.ones_like(logits_per_image), 0 * logits_per_image)
    l_cbs = -(torch.log(1 - logits_per_image) * mask).sum()
    l_reg = torch.mean(x)
    return {"otm": l_otm, "btm": l_btm, "cbs": l_cbs, "reg": l_reg}, logits_per_image
