"""PBIP against a transcription of QingchenTang/PBIP (k-means, prototype logits, losses, CAMs), training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_setup import MEAN, STD, clip_method, tiny_clip
from method_training import FAST_BACKBONE, train_steps
from sklearn.metrics.pairwise import cosine_similarity

from wsss_domains.cli import main
from wsss_domains.clip.loading import ClipWeightsMissing, clip_mean_std, load_clip
from wsss_domains.domains import DomainPlugin
from wsss_domains.errors import UserError
from wsss_domains.methods import create_method, list_methods
from wsss_domains.models.classifier import CamClassifier
from wsss_domains.models.stages import capture_stages
from wsss_domains.models.weights import WeightsNotFound
from wsss_domains.training.fit import TrainOptions, train
from wsss_domains.training.run import RunConfig, load_run

K = 3  # sub-classes per class (the official k_list 3 3 3 3)


class _Domain(DomainPlugin):
    name = "pbip-test"

    def datasets(self):
        return {}


@pytest.fixture
def tiny_weights(tmp_path):
    return tiny_clip(tmp_path, "wsss-tiny-pbip", seed=3)


def _method(tiny_weights, **options):
    return clip_method("pbip", tiny_weights, _Domain(), **options)


# -- the official code, transcribed ---------------------------------------------------------------
def official_kmeans(X, n_clusters, random_state=42, max_iter=100):
    """``k_mean_cos_per_class.py: CosineSimilarityKMeans.fit_predict`` (its centres)."""
    np.random.seed(random_state)
    n_samples = X.shape[0]
    idx = np.random.choice(n_samples, n_clusters, replace=False)
    centers = X[idx]
    for _ in range(max_iter):
        similarities = cosine_similarity(X, centers)
        new_labels = np.argmax(similarities, axis=1)
        old_centers = centers.copy()
        for i in range(n_clusters):
            cluster_samples = X[new_labels == i]
            if len(cluster_samples) > 0:
                centers[i] = cluster_samples.mean(axis=0)
                centers[i] /= np.linalg.norm(centers[i])
        if np.allclose(old_centers, centers):
            break
    return centers


def official_stage(x, l_fea_adapted, logit_scale):
    """One stage of ``ClsNetwork.forward``: (cls, cam)."""
    imshape = x.shape
    feats = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = logit_scale * feats @ l_fea_adapted.t().float()
    out = logits.view(imshape[0], imshape[2], imshape[3], -1).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(out, (1, 1)).view(-1, out.shape[1]), out


def official_merge_predictions(predictions, k_list, method):
    parent_preds, start_idx = [], 0
    for k in k_list:
        class_preds = predictions[:, start_idx : start_idx + k]
        if method == "max":
            parent_preds.append((torch.softmax(class_preds, dim=1) * class_preds).sum(dim=1))
        else:
            parent_preds.append(torch.mean(class_preds, dim=1))
        start_idx += k
    return torch.stack(parent_preds, dim=1)


def official_merge_cams(cams, k_list):
    """``merge_subclass_cams_to_parent(method='max')``."""
    batch_size, _, H, W = cams.shape
    parent_cams = torch.zeros(batch_size, len(k_list), H, W, dtype=cams.dtype)
    start_idx = 0
    for parent_idx, k in enumerate(k_list):
        cams_flat = cams[:, start_idx : start_idx + k].reshape(batch_size, k, H * W)
        parent_cams[:, parent_idx] = (
            (torch.softmax(cams_flat, dim=1) * cams_flat).sum(dim=1).view(batch_size, H, W)
        )
        start_idx += k
    return parent_cams


def official_expand(parent_labels, k_list):
    out = torch.zeros(parent_labels.size(0), sum(k_list), dtype=parent_labels.dtype)
    start_idx = 0
    for parent_idx, k in enumerate(k_list):
        out[:, start_idx : start_idx + k] = parent_labels[:, parent_idx : parent_idx + 1].repeat(1, k)
        start_idx += k
    return out


def official_contrast(inputs, cam4, cls_bir, l_fea, vision_model, clip_size, alpha=0.5):
    """``FeatureExtractor.process_batch`` + ``pair_features`` + ``InfoNCELossFG/BG`` (temperature 0.07)."""
    cam_224 = F.interpolate(cam4, (clip_size, clip_size), mode="bilinear", align_corners=True)
    binary = []
    for i in range(cam_224.shape[0]):  # MaskAdapter_DynamicThreshold
        th = torch.max(cam_224[i]) * alpha
        binary.append(
            torch.where(cam_224[i] >= th, torch.ones_like(cam_224[0]), torch.zeros_like(cam_224[0]))
        )
    cam_224_mask = torch.stack(binary, dim=0)
    batch_indices, class_indices = torch.where(cls_bir == 1)
    img_selected = inputs[batch_indices]
    cam_expanded = cam_224[batch_indices, class_indices].unsqueeze(1)
    mask_expanded = cam_224_mask[batch_indices, class_indices].unsqueeze(1)
    fg_features = cam_expanded * img_selected
    bg_features = (1 - cam_expanded) * img_selected
    fg_min, fg_max = fg_features.amin(dim=(2, 3), keepdim=True), fg_features.amax(dim=(2, 3), keepdim=True)
    bg_min, bg_max = bg_features.amin(dim=(2, 3), keepdim=True), bg_features.amax(dim=(2, 3), keepdim=True)
    fg_img = vision_model((fg_features - fg_min) / (fg_max - fg_min + 1e-8) * mask_expanded)
    bg_img = vision_model((bg_features - bg_min) / (bg_max - bg_min + 1e-8) * (1 - mask_expanded))
    fg_text = [l_fea[c] for c in class_indices]
    bg_text = [l_fea[[j for j in range(l_fea.shape[0]) if j != c]] for c in class_indices]
    fg_text, bg_text = torch.stack(fg_text), torch.stack(bg_text)

    def fg_loss(f):
        positive = torch.tensor(0.0)
        negative = torch.tensor(0.0)
        f = f / f.norm(dim=-1, keepdim=True)
        for i in range(f.shape[0]):
            pos = f[i : i + 1] @ fg_text[i : i + 1].t()
            neg = f[i : i + 1] @ bg_text[i].t()
            positive = positive + torch.exp(pos / 0.07).sum()
            negative = negative + torch.exp(pos / 0.07).sum() + torch.exp(neg / 0.07).sum()
        return -torch.log(positive / negative)

    def bg_loss(b):
        positive = torch.tensor(0.0)
        negative = torch.tensor(0.0)
        b = b / b.norm(dim=-1, keepdim=True)
        for i in range(b.shape[0]):
            others = b[i : i + 1] @ bg_text[i].t()
            own = b[i : i + 1] @ fg_text[i : i + 1].t()
            positive = positive + torch.exp(others / 0.07).mean()
            negative = negative + torch.exp(others / 0.07).mean() + torch.exp(own / 0.07).sum()
        return -torch.log(positive / negative)

    return fg_loss(fg_img), bg_loss(bg_img)


def _vision_model(clip):
    """What stands for MedCLIP's ``vision_model`` here: the open_clip tower behind CLIP's normalisation."""
    mean, std = (torch.tensor(v)[:, None, None] for v in clip_mean_std(clip))
    return lambda x: clip.encode_image((x - mean) / std).float()


# -- tests ------------------------------------------------------------------------------------------
def test_prototypes_are_the_official_cosine_kmeans_of_single_class_images(tiny_weights):
    name, path = tiny_weights
    clip, *_ = load_clip(name, path)
    gen = torch.Generator().manual_seed(0)
    labels = [[1, 0]] * 5 + [[0, 1]] * 4 + [[1, 1]] * 2 + [[0, 0]]  # multi-class and empty images unused
    samples = [{"image": torch.randn(3, 32, 32, generator=gen) * 2, "label": torch.tensor(y, dtype=torch.float)}
               for y in labels]  # fmt: skip
    method = _method(tiny_weights)
    method.prepare_training(samples)

    expected, embeddings = [], []
    for rows in (range(0, 5), range(5, 9)):
        feats = []
        for i in rows:  # excract_medclip_proces.py: normalised image, min-max over all of it, vision model
            img = samples[i]["image"]
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            feats.append(_vision_model(clip)(img[None])[0].numpy())
        array = np.array(feats, dtype=np.float64)
        array /= np.linalg.norm(array, axis=1, keepdims=True)
        embeddings.append(array)
        expected.append(official_kmeans(array.copy(), K))
    expected = torch.from_numpy(np.concatenate(expected)).float()
    assert method.prototypes.shape == (2 * K, 32)
    torch.testing.assert_close(method.prototypes, expected, rtol=1e-4, atol=1e-5)
    # some cluster holds more than one image: a centre is a mean, not one of the embeddings
    every = torch.from_numpy(np.concatenate(embeddings)).float()
    assert float(torch.cdist(expected, every).min(dim=1).values.max()) > 1e-3


def test_prototypes_from_a_folder_of_example_crops_in_the_official_layout(tiny_weights, tmp_path):
    from PIL import Image

    name, path = tiny_weights
    clip, *_ = load_clip(name, path)
    rng = np.random.default_rng(0)
    root = tmp_path / "proto"
    pixels = {}
    for cls, count in (("tumor", 4), ("stroma", 5)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            rgb = rng.integers(0, 256, size=(20 + i, 24, 3), dtype=np.uint8)  # crops of several sizes
            Image.fromarray(rgb).save(root / cls / f"{i:02d}.png")
            pixels[(cls, i)] = rgb
    (root / "notes.txt").write_text("not a class")
    method = _method(tiny_weights, examples=str(root))
    method.prepare_training([], class_names=["tumor", "stroma"])  # the split is not read
    expected = []
    for cls, count in (("tumor", 4), ("stroma", 5)):
        feats = []
        for i in range(count):  # excract_medclip_proces.py: Normalize(MEAN, STD), min-max over the image
            img = torch.from_numpy(pixels[(cls, i)]).permute(2, 0, 1).float() / 255
            img = (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
            img = (img - img.min()) / (img.max() - img.min() + 1e-8)
            size = clip.visual.image_size
            img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=True)
            feats.append(_vision_model(clip)(img)[0].numpy())
        array = np.array(feats, dtype=np.float64)
        array /= np.linalg.norm(array, axis=1, keepdims=True)
        expected.append(official_kmeans(array.copy(), K))
    torch.testing.assert_close(
        method.prototypes, torch.from_numpy(np.concatenate(expected)).float(), rtol=1e-4, atol=1e-5
    )

    with pytest.raises(UserError, match="no subfolder 'normal'.*found: stroma, tumor"):
        method.prepare_training([], class_names=["tumor", "normal"])
    with pytest.raises(UserError, match="holds 4 images, fewer than prototypes_per_class=5"):
        _method(tiny_weights, examples=str(root), prototypes_per_class=5).prepare_training(
            [], class_names=["tumor"]
        )
    with pytest.raises(UserError, match="does not exist"):
        _method(tiny_weights, examples=str(tmp_path / "nowhere"))


def test_kmeans_with_real_clusters_matches_the_official_one():
    from wsss_domains.methods.pbip import cosine_kmeans

    rng = np.random.default_rng(1)
    directions = rng.normal(size=(3, 8))
    X = np.concatenate([d + 0.3 * rng.normal(size=(10, 8)) for d in directions])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_kmeans(X, 3), official_kmeans(X.copy(), 3), rtol=1e-10)


def test_classes_without_enough_single_class_images_use_the_images_holding_them(tiny_weights):
    from wsss_domains.methods.pbip import example_images

    labels = torch.tensor([[1, 0], [1, 0], [1, 0], [1, 1], [1, 1], [0, 1], [0, 0]]).bool()
    with pytest.warns(UserWarning, match="class 1 has 1 single-class"):
        chosen = example_images(labels, 3)
    assert chosen == [[0, 1, 2], [3, 4, 5]]
    assert example_images(labels, 1) == [[0, 1, 2], [5]]
    with pytest.raises(UserError, match=r"class 1 is present in 3 .*prototypes_per_class=4"):
        example_images(labels, 4)
    samples = [{"image": torch.rand(3, 32, 32), "label": y.float()} for y in labels]
    method = _method(tiny_weights)
    with pytest.warns(UserWarning):
        method.prepare_training(samples)
    assert method.prototypes.shape == (6, 32)


def _model_and_method(tiny_weights, **options):
    torch.manual_seed(0)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    method = _method(tiny_weights, **options)
    method.prototypes = F.normalize(torch.randn(2 * K, 32), dim=1)
    modules = method.build_modules(model)
    with torch.no_grad():  # trained-looking scales, different per stage
        modules["pbip"].scales.copy_(torch.tensor([9.0, 11.0, 13.0, 15.0]))
    return model, method, modules


def _official_forward(model, modules, method, image):
    head = modules["pbip"]
    with capture_stages(model.backbone, method.stages(model)) as captured:
        final = model.features(image)
    outs = []
    for i, x in enumerate([*captured, final]):
        outs.append(official_stage(x, head.adapters[i](head.prototypes), head.scales[i]))
    return outs


def test_stage_logits_losses_and_gradients_follow_the_official_code(tiny_weights):
    name, path = tiny_weights
    clip, *_ = load_clip(name, path)
    model, method, modules = _model_and_method(tiny_weights)
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(3, 3, 32, 32, generator=gen)
    label = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    batch = {"image": image, "label": label}

    outputs = method.forward(model, modules, batch)
    official = _official_forward(model, modules, method, image)
    for i, (cls, _) in enumerate(official):
        torch.testing.assert_close(outputs[f"sub_logits{i + 1}"], cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs["sub_maps4"], official[3][1], rtol=1e-5, atol=1e-5)

    # The losses of train_stage_1.py on the same tensors (cam4 a leaf, to compare gradients).
    cam4 = outputs["sub_maps4"].detach().clone().requires_grad_(True)
    ours = method.training_losses(model, modules, batch, {**outputs, "sub_maps4": cam4})
    k_list = [K, K]
    cls4 = official[3][0].detach()
    subclass_labels = official_expand(label, k_list)
    cls4_bir = (cls4 > official_expand(official_merge_predictions(cls4, k_list, "mean"), k_list)).float()
    cls4_bir = cls4_bir * subclass_labels
    assert 0 < int(cls4_bir.sum()) < int(subclass_labels.sum())  # some sub-classes contrasted, not all
    reference = cam4.detach().clone().requires_grad_(True)
    fg, bg = official_contrast(
        image, reference, cls4_bir, modules["pbip"].prototypes, _vision_model(clip), 32
    )
    l5 = 0.1
    weights = (0.0, 0.1, 1.0, 1.0)
    for i, w in enumerate(weights):
        merged = official_merge_predictions(official[i][0], k_list, "mean")
        expected = w * F.binary_cross_entropy_with_logits(merged, label)
        torch.testing.assert_close(ours[f"cls{i + 1}"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["fg"], l5 * fg, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["bg"], l5 * bg, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["area"], l5 * 0.0005 * reference.mean(), rtol=1e-5, atol=1e-8)
    assert float(fg.detach()) > 0 and float(bg.detach()) > 0

    (ours["fg"] + ours["bg"] + ours["area"]).backward()
    (l5 * (fg + bg + 0.0005 * torch.mean(reference))).backward()
    scale = float(reference.grad.abs().max())
    assert scale > 0 and torch.allclose(cam4.grad, reference.grad, rtol=1e-3, atol=1e-4 * scale)


def test_cams_fuse_the_official_stage_maps(tiny_weights):
    model, method, modules = _model_and_method(tiny_weights)
    model.eval()
    image = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(4))
    extractor = method.extractor(model, modules, scales=(1.0,), flip=False)
    with torch.no_grad():
        ours = extractor.raw_maps(image)
        official = _official_forward(model, modules, method, image)
    size = official[1][1].shape[-2:]  # the stride-8 grid (official: the input size)
    fused = 0
    for weight, (_, cam) in zip((0.3, 0.3, 0.4), official[1:], strict=True):
        cam = official_merge_cams(cam, [K, K]).clamp_min(0)  # get_seg_label: np.maximum(cams, 0)
        low, high = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
        cam = (cam - low) / (high - low + 1e-6)
        fused = fused + weight * F.interpolate(cam, size=size, mode="bilinear", align_corners=True)
    torch.testing.assert_close(ours, fused, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="sigmoid"):
        method.extractor(model, modules, normalization="sigmoid")


def test_training_moves_the_backbone_and_prototype_head_not_the_linear_head_or_clip(tiny_weights):
    name, path = tiny_weights
    method = _method(tiny_weights)
    method.prototypes = F.normalize(torch.randn(2 * K, 32, generator=torch.Generator().manual_seed(5)), dim=1)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    head_before = model.head.weight.detach().clone()
    backbone_before = model.backbone.conv_stem.weight.detach().clone()
    task, logged, initial = train_steps(method, steps=3, model=model)
    for key in ("cls2", "cls3", "cls4", "fg", "bg", "area"):
        assert f"train/{key}" in logged
    assert logged["train/fg"] > 0
    now = task.method_modules.state_dict()
    assert not torch.equal(now["pbip.scales"], initial["pbip.scales"])
    assert not torch.equal(now["pbip.adapters.3.2.weight"], initial["pbip.adapters.3.2.weight"])
    assert torch.equal(now["pbip.prototypes"], initial["pbip.prototypes"])  # fixed, like the official l_fea
    assert torch.equal(task.model.head.weight, head_before)  # the linear CAM head is not PBIP's
    assert not torch.equal(task.model.backbone.conv_stem.weight, backbone_before)
    reloaded, *_ = load_clip(name, path)
    clip = method._encoder.forward.__self__
    for (key, a), b in zip(clip.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


class _Samples(torch.utils.data.Dataset):
    """Images in [0, 1] with a bright square per class; four single-class images per class."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(7)
        self.items = []
        for label in [[1, 0]] * 4 + [[0, 1]] * 4 + [[1, 1]] * 2:
            image = torch.rand(3, 32, 32, generator=gen) * 0.3
            if label[0]:
                image[0, 2:14, 2:14] = 1.0
            if label[1]:
                image[2, 18:30, 18:30] = 1.0
            self.items.append({"image": image, "label": torch.tensor(label, dtype=torch.float)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def test_a_run_trains_from_the_split_and_reloads_without_it(tiny_weights, tmp_path, monkeypatch):
    from wsss_domains.methods.pbip import Pbip

    devices = []
    original = Pbip.prepare_training
    monkeypatch.setattr(
        Pbip,
        "prepare_training",
        lambda self, data, device=None, class_names=None: (
            devices.append((device, class_names)) or original(self, data, device, class_names)
        ),
    )
    name, path = tiny_weights
    options = {"clip_model": name, "clip_weights": str(path), "prototypes_per_class": 2}
    config = RunConfig(domain="pbip-test", dataset="squares", classes=["bg", "red", "blue"],
                       foreground=["red", "blue"], backbone=FAST_BACKBONE, weights="random",
                       image_size=[32, 32], mean=MEAN, std=STD, method="pbip", method_options=options)  # fmt: skip
    trainer = train(config, _Domain(), _Samples(), tmp_path / "run",
                    TrainOptions(batch_size=4, device="cpu", max_steps=2))  # fmt: skip
    assert trainer.global_step == 2 and devices == [
        (torch.device("cpu"), ["red", "blue"])
    ]  # where the run trains
    trained = trainer.lightning_module.method_modules["pbip"].prototypes
    assert trained.shape == (4, 32) and float(trained.norm(dim=1).min()) > 0.99
    _, model, modules = load_run(tmp_path / "run")  # no training split, no CLIP forward needed
    torch.testing.assert_close(modules["pbip"].prototypes, trained.cpu())
    method = create_method("pbip", **options)
    cams = method.extractor(model, modules, scales=(1.0,))(torch.randn(3, 32, 32))
    assert cams.shape == (2, 32, 32) and float(cams.max()) <= 1.0


def test_listed_and_fails_clearly_without_clip_weights(tmp_path, capsys):
    assert "pbip" in list_methods()
    assert main(["methods"]) == 0
    assert "pbip" in capsys.readouterr().out
    method = create_method("pbip", clip_model="ViT-B-16", clip_weights=str(tmp_path / "none.pt"))
    with pytest.raises(ClipWeightsMissing, match="--clip-weights"):
        method.setup(_Domain(), MEAN, STD)
    with pytest.raises(ValueError, match="stage_weights"):
        create_method("pbip", stage_weights=[1.0, 1.0])


def test_an_imagenet_cnn_can_stand_in_for_clip():
    """``encoder=NAME``: the timm CNN's pooled features at its own input size and statistics."""
    import timm

    method = create_method("pbip", encoder="test_efficientnet", encoder_weights="random")
    method.setup(_Domain(), MEAN, STD)
    cnn = method._encoder.forward
    assert not cnn.training and not any(p.requires_grad for p in cnn.parameters())
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(8))
    config = cnn.pretrained_cfg
    size = (224, 224)  # the official clip_size
    mean, std = (torch.tensor(v)[:, None, None] for v in (config["mean"], config["std"]))
    resized = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
    expected = cnn.forward_head(cnn.forward_features((resized - mean) / std), pre_logits=True)
    torch.testing.assert_close(method.embed(images), expected)
    dim = timm.create_model("test_efficientnet", num_classes=0).num_features
    samples = [
        {"image": torch.rand(3, 32, 32), "label": torch.tensor(y)} for y in ([1.0, 0.0], [0.0, 1.0]) * 3
    ]
    method.prepare_training(samples)
    assert method.prototypes.shape == (6, dim)
    model = CamClassifier(num_classes=2, backbone=FAST_BACKBONE, weights="random")
    modules = method.build_modules(model)
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    losses = method.training_losses(model, modules, batch, method.forward(model, modules, batch))
    assert float(losses["fg"].detach()) > 0
    with pytest.raises(WeightsNotFound):
        create_method("pbip", encoder="test_efficientnet").setup(_Domain(), MEAN, STD)


def test_checkpointed_embedding_keeps_values_and_gradients():
    """Chunked activation checkpointing (memory) must not change the embeddings or their gradients."""
    from wsss_domains.methods.pbip import EMBED_CHUNK

    method = create_method("pbip", encoder="test_efficientnet", encoder_weights="random")
    method.setup(_Domain(), MEAN, STD)
    cnn = method._encoder.forward
    images = torch.rand(EMBED_CHUNK + 3, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    direct = images.clone().requires_grad_(True)
    config = cnn.pretrained_cfg
    mean, std = (torch.tensor(v)[:, None, None] for v in (config["mean"], config["std"]))
    resized = F.interpolate(direct, size=(224, 224), mode="bilinear", align_corners=True)
    expected = cnn.forward_head(cnn.forward_features((resized - mean) / std), pre_logits=True)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    (expected * weights).sum().backward()
    chunked = images.clone().requires_grad_(True)
    embedded = method.embed(chunked)
    (embedded * weights).sum().backward()
    torch.testing.assert_close(embedded, expected)
    torch.testing.assert_close(chunked.grad, direct.grad)
