"""`cdm-train eval`: FID and CLIP score of N generated samples against the user's own data.

Modules: ``frechet`` (the package's one Frechet distance, also used by the digits evaluator),
``inception`` (FID features from a local Inception file), ``clip_score`` (transformers' CLIP from a
local directory), ``references`` (reference image folders, their statistics and the statistics cache),
``samplers`` (students of runs and exported pipelines, the teacher baseline; prompt-derived seeds),
``runner`` (the command: generation, metrics, report).
"""
