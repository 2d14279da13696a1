"""CPU speed of every CLIP method of the registry on a tiny random tower at ViT-B/16 depth.

No CLIP weights exist on this machine, so the tower is open_clip's ``CLIP`` with random weights at
the depth, patch size and input of ViT-B/16 (12 blocks, 16 px patches, 224 px) but width 64 (the
tiny tower of the tests, ``wsss_domains.clip.tiny``): the figures show each method's own overhead
and how it scales with depth, not the cost of a full-width ViT-B/16 (about 12x the width, so far
slower). Each method is driven through the registry as the engine drives it:

* ``clip-es``: ``Method.refine`` of one 224 px image with three present VOC classes (GradCAM of all
  classes in one backward, class-aware attention refinement), text embeddings kept across images;
* ``clip-es-learned``: the same with a CoOp-style ``PromptLearner`` (4 context tokens) as the text
  source, as a learned-prompt artefact gives;
* ``maskclip``: ``Method.refine`` of the same image (one pass of the tower, the last block on its values);
* ``clims``: one training step (forward, the engine's loss plus the CLIMS terms, backward) of the
  EfficientNet-Lite0 classifier on a batch of 8 224 px images, against the same step of plain CAM;
* ``pole``: the same step with POLE's per-pair synonym choice (one more CLIP image pass per pair,
  without gradient; VOC's prompt names give ``person`` three candidates, present in every image);
* ``semples``: one training step in its prompt-learning stage (b: the matching terms plus the
  prompts' two terms, the prompts through the text tower with gradient) and one in its refinement
  stage (c: the prompts encoded without gradient), prompts of 26 vectors (official 30; the tower
  reads 32 tokens);
* ``pbip``: one training step of PBIP (its prototype head on four stages, the per-stage losses and
  CLIP's contrast of every contrasted sub-class's masked foreground and background), 3 random
  prototypes per VOC class standing for those ``prepare_training`` clusters from the split;
* ``pot``: one training step (the cluster prototypes of every present class's seeds, k-means over
  the hierarchical features, CLIP-ES maps of each image's present classes, the consistency loss) and
  the pseudo-labels of one 224 px image with three present classes (the engine's four scales with
  flips of the cluster-prototype maps, then CLIP-ES's background and POT's rule);
* ``weclip``: one decoder update of its fit (the official batch of 4 crops of 320 px: the frozen
  tower's blocks, CLIP-ES labels refined by the decoder's affinity and PAR, both losses, backward),
  and ``Method.refine`` of one 224 px image with three present classes after fitting.

Medians of ``--repeats`` runs after one warm-up. Prints a table and appends it, with the command and
the machine's load, to benchmarks/results/clip_methods_speed.md.

    python benchmarks/clip_methods_speed.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from wsss_domains.clip.tiny import save_tiny_clip, tiny_model_config
from wsss_domains.domains import create_domain
from wsss_domains.methods import create_method
from wsss_domains.methods.base import RefineContext

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "clip_methods_speed.md"
ARCH = "wsss-speed-vitb16-depth"
TOWER = {"image_size": 224, "patch_size": 16, "layers": 12}
PRESENT = ("aeroplane", "bird", "person")
SEMPLES_PROMPT_LENGTH = 26  # the longest prompt the tower's 32 tokens hold


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: lazy loads, text embeddings, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def register_tower(folder: Path) -> Path:
    """The tower as an open_clip architecture and a random checkpoint file, as a user's would be."""
    path, _ = save_tiny_clip(folder, ARCH, seed=0, config=tiny_model_config(**TOWER))
    return path


def clip_es_refine(name: str, weights: Path, learned: bool) -> Callable[[], object]:
    domain = create_domain("voc")
    space = domain.dataset("voc2012").label_space
    method = create_method(
        name, clip_model=ARCH, clip_weights=str(weights), **({"prompts": "x"} if learned else {})
    )
    method.setup(domain, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if learned:  # what load_learned_prompts returns for an artefact: a PromptLearner on the tower
        from wsss_domains.clip.learned_prompts import PromptLearner
        from wsss_domains.clip.text import FrozenText

        loaded = method._clip(torch.device("cpu"))
        prompts = domain.clip_prompts(space)
        learner = PromptLearner(
            loaded.model, loaded.tokenizer, {c: c for c in space.foreground_names}, list(prompts.background)
        )
        method._text[space.classes] = FrozenText(learner)  # as ClipEsLearned.text_source wraps an artefact
    present = torch.tensor([float(c in PRESENT) for c in space.foreground_names])
    image = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    context = RefineContext.of(image, present, domain, space)
    cams = torch.rand(len(present), 224, 224)
    return lambda: method.refine(cams, context)


def training_step(method_name: str, weights: Path, progress: float = 0.5) -> Callable[[], object]:
    from wsss_domains.models.classifier import CamClassifier

    domain = create_domain("voc")
    classes = len(domain.dataset("voc2012").label_space.foreground)
    clip_method = method_name in ("clims", "pole", "pbip", "semples", "pot")
    options = {"clip_model": ARCH, "clip_weights": str(weights)} if clip_method else {}
    if method_name == "semples":
        options["prompt_length"] = SEMPLES_PROMPT_LENGTH
    method = create_method(method_name, **options)
    method.setup(domain, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    model = CamClassifier(classes, backbone="tf_efficientnet_lite0", weights="random")
    if method_name == "pbip":  # what prepare_training clusters from a split: 3 unit prototypes per class
        prototypes = torch.randn(classes * 3, 32, generator=torch.Generator().manual_seed(1))
        method.prototypes = torch.nn.functional.normalize(prototypes, dim=1)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(8, classes, generator=generator) < 0.15).float()
    labels[:, 14] = 1.0  # every image holds a person, so the CLIMS terms always run
    batch = {
        "image": torch.randn(8, 3, 224, 224, generator=generator),
        "label": labels,
        "progress": torch.tensor(progress),
    }
    modules = method.build_modules(model)

    def step() -> None:
        model.zero_grad()
        modules.zero_grad()
        outputs = method.forward(model, modules, batch)
        loss = method.classification_weight * torch.nn.functional.multilabel_soft_margin_loss(
            outputs["logits"], labels
        )
        extra = method.training_losses(model, modules, batch, outputs)
        (loss + sum(extra.values())).backward()

    return step


def pot_pseudo_label(weights: Path) -> Callable[[], object]:
    """POT's pseudo-label maps of one image: its extractor (every scale, flipped) then its refine."""
    from wsss_domains.models.classifier import CamClassifier

    domain = create_domain("voc")
    space = domain.dataset("voc2012").label_space
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    method = create_method("pot", clip_model=ARCH, clip_weights=str(weights))
    method.setup(domain, mean, std)
    model = CamClassifier(len(space.foreground), backbone="tf_efficientnet_lite0", weights="random").eval()
    extractor = method.extractor(model, method.build_modules(model))
    present = torch.tensor([float(c in PRESENT) for c in space.foreground_names])
    image = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    normalized = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    context = RefineContext.of(image, present, domain, space)
    return lambda: method.refine(extractor(normalized), context)


def weclip_calls(weights: Path) -> tuple[Callable[[], object], Callable[[], object]]:
    """One decoder update (a fit of one step, after the switch to the decoder's affinity) and one refine."""
    from types import SimpleNamespace

    from wsss_domains.methods.fitting import FitContext

    domain = create_domain("voc")
    space = domain.dataset("voc2012").label_space
    present = torch.tensor([float(c in PRESENT) for c in space.foreground_names])
    generator = torch.Generator().manual_seed(0)
    images = [
        {"image": torch.rand(3, 360, 480, generator=generator), "label": present, "id": str(i)}
        for i in range(4)
    ]
    method = create_method("weclip", clip_model=ARCH, clip_weights=str(weights), steps=1, switch=0.0)
    method.setup(domain, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    context = FitContext(
        dataset=images, extractor=SimpleNamespace(model=torch.nn.Linear(1, 1)), domain=domain,  # type: ignore[arg-type]
        label_space=space, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    )  # fmt: skip
    image = torch.rand(3, 224, 224, generator=generator)
    refine_context = RefineContext.of(image, present, domain, space)
    cams = torch.rand(len(present), 224, 224)
    method.fit(context)
    return (lambda: method.fit(context)), (lambda: method.refine(cams, refine_context))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        weights = register_tower(Path(folder))
        rows = [
            ("clip-es", "pseudo-label one image (3 classes)", median_ms(clip_es_refine("clip-es", weights, False), args.repeats)),
            ("clip-es-learned", "pseudo-label one image (3 classes)", median_ms(clip_es_refine("clip-es-learned", weights, True), args.repeats)),
            ("maskclip", "pseudo-label one image (3 classes)", median_ms(clip_es_refine("maskclip", weights, False), args.repeats)),
        ]  # fmt: skip
        cam_step = median_ms(training_step("cam", weights), args.repeats)
        clims_step = median_ms(training_step("clims", weights), args.repeats)
        pole_step = median_ms(training_step("pole", weights), args.repeats)
        rows.append(("clims", "training step, batch 8 x 224 px", clims_step))
        pbip_step = median_ms(training_step("pbip", weights), args.repeats)
        rows.append(("pole", "training step, batch 8 x 224 px", pole_step))
        rows.append(("pbip", "training step, batch 8 x 224 px", pbip_step))
        semples_b = median_ms(training_step("semples", weights, progress=0.5), args.repeats)
        semples_c = median_ms(training_step("semples", weights, progress=0.8), args.repeats)
        rows.append(("semples", "training step, prompt learning (b), batch 8 x 224 px", semples_b))
        rows.append(("semples", "training step, refinement (c), batch 8 x 224 px", semples_c))
        pot_step = median_ms(training_step("pot", weights), args.repeats)
        rows.append(("pot", "training step, batch 8 x 224 px", pot_step))
        rows.append(
            ("pot", "pseudo-label one image (3 classes)", median_ms(pot_pseudo_label(weights), args.repeats))
        )
        weclip_fit, weclip_refine = weclip_calls(weights)
        rows.append(("weclip", "decoder update, batch 4 x 320 px crops", median_ms(weclip_fit, args.repeats)))
        rows.append(("weclip", "pseudo-label one image (3 classes)", median_ms(weclip_refine, args.repeats)))
    lines = [
        f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"\nTower: open_clip CLIP, random weights, {TOWER['layers']} blocks, {TOWER['patch_size']} px patches, "
        f"{TOWER['image_size']} px, width 64. Median of {args.repeats} runs after a warm-up; {platform.machine()}, "
        f"{args.threads} torch threads, {os.cpu_count()} cores, torch {torch.__version__}; load average (1 min) "
        f"{load:.2f} at the start.",
        "\n| method | what is timed | ms |",
        "|---|---|---|",
        *[f"| `{name}` | {what} | {ms:.1f} |" for name, what, ms in rows],
        f"| `cam` (reference) | training step, batch 8 x 224 px | {cam_step:.1f} |",
        f"\nCLIMS adds {clims_step - cam_step:.1f} ms to a plain-CAM step ({clims_step / cam_step:.2f}x); "
        f"POLE's choice adds {pole_step - clims_step:.1f} ms to a CLIMS step ({pole_step / clims_step:.2f}x); "
        f"a PBIP step costs {pbip_step / cam_step:.2f}x a plain-CAM step; SemPLeS steps cost "
        f"{semples_b / cam_step:.2f}x (b) and {semples_c / cam_step:.2f}x (c); a POT step {pot_step / cam_step:.2f}x.",
        "\nCommand:\n",
        "```",
        shlex.join(["python", "benchmarks/clip_methods_speed.py", *sys.argv[1:]]),
        "```",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        if not RESULTS.exists():
            RESULTS.write_text("# CPU speed of the CLIP methods (tiny tower at ViT-B/16 depth)\n")
        with RESULTS.open("a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
