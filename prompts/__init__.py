"""Per-domain CLIP prompt templates and learned prompt artefacts (import name ``wsss_prompts``)."""
