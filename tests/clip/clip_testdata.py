"""In-memory labelled data for the CLIP tests."""

from __future__ import annotations

import torch


class ColourSquares(torch.utils.data.Dataset):
    """Images whose labelled classes paint a coloured square each: learnable from labels alone."""

    def __init__(self, n: int = 16, size: int = 32, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            label = (torch.rand(3, generator=gen) < 0.5).float()
            if label.sum() == 0:
                label[i % 3] = 1.0
            image = torch.rand(3, size, size, generator=gen) * 0.2
            for c in torch.nonzero(label).flatten().tolist():
                y, x = (c * 9) % (size - 12), (c * 13) % (size - 12)
                image[c, y : y + 12, x : x + 12] = 1.0
            self.items.append({"image": image, "label": label, "id": f"sq{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]
