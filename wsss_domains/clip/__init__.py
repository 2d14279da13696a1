"""CLIP for WSSS, one concept per module; import from the module that holds what you need.

- ``loading``: offline model loading (``load_clip``, ``resolve_clip_weights``) and its errors.
- ``clip_es``: CLIP-ES CAMs (``clip_es_cams``, ``gradcam_maps``); ``caa``: class-aware attention refinement.
- ``text``: text features of the class prompts (``ZeroShotText``, ``TextFeatureSource``).
- ``learned_prompts``: prompt learning with peft (``train_prompts``, ``PromptLearner``).
- ``artefacts``: learned-prompt files in the user data folder (save, load, list, checksum).
- ``prompt_files``: the per-domain prompt files of ``wsss_prompts`` (read by plugins).

Nothing is imported here: plugins read ``prompt_files`` while `wsss-domains domains` lists them,
which must not load torch or open_clip.
"""
