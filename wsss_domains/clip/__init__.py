"""CLIP for WSSS: offline model loading, CLIP-ES CAMs, learned prompts, per-domain prompt files."""

from wsss_domains.clip.artefacts import (
    LearnedPromptsError,
    artefact_dir,
    frozen_checksum,
    list_learned_prompts,
    load_learned_prompts,
    save_learned_prompts,
)
from wsss_domains.clip.caa import box_mask, caa_refine, sinkhorn_affinity
from wsss_domains.clip.clip_es import clip_es_cams, gradcam_maps
from wsss_domains.clip.learned_prompts import PromptLearner, PromptTrainConfig, TrainResult, train_prompts
from wsss_domains.clip.loading import (
    ClipCheckpointMismatch,
    ClipUnsupported,
    ClipWeightsMissing,
    LoadedClip,
    load_clip,
    resolve_clip_weights,
)
from wsss_domains.clip.prompt_files import clip_prompts_from_file, load_prompt_file, prompt_file_domains
from wsss_domains.clip.text import TextFeatureSource, ZeroShotText

__all__ = [
    "ClipCheckpointMismatch",
    "ClipUnsupported",
    "ClipWeightsMissing",
    "LearnedPromptsError",
    "LoadedClip",
    "PromptLearner",
    "PromptTrainConfig",
    "TextFeatureSource",
    "TrainResult",
    "ZeroShotText",
    "artefact_dir",
    "box_mask",
    "caa_refine",
    "clip_es_cams",
    "clip_prompts_from_file",
    "frozen_checksum",
    "gradcam_maps",
    "list_learned_prompts",
    "load_clip",
    "load_learned_prompts",
    "load_prompt_file",
    "prompt_file_domains",
    "resolve_clip_weights",
    "save_learned_prompts",
    "sinkhorn_affinity",
    "train_prompts",
]
