"""One home per model family; this registry maps presets and pipelines to them.

    sd3.py          SD3Transformer2DModel / StableDiffusion3Pipeline   tiny, sd3-medium, sd3-medium-shape
    flux.py         FluxTransformer2DModel / FluxPipeline              flux, flux-shape, flux-tiny
    longcat.py      LongCatImageTransformer2DModel / LongCatImagePipeline   longcat, longcat-shape, longcat-tiny
    class_label.py  class-conditional models (the digits default)      digits

A new family is one file with a `FAMILY` (a models.base.ModelFamily) listed in FAMILIES below.
"""

from __future__ import annotations

from ..errors import ConfigError
from . import class_label, flux, longcat, sd3
from .base import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (sd3.FAMILY, flux.FAMILY, longcat.FAMILY, class_label.FAMILY)
PRESETS: dict[str, dict] = {name: values for fam in FAMILIES for name, values in fam.presets.items()}
_BY_PRESET = {name: fam for fam in FAMILIES for name in fam.presets}
_BY_PIPELINE = {fam.pipeline_class_name: fam for fam in FAMILIES if fam.pipeline_class_name}


def family_of(preset: str) -> ModelFamily:
    """The family a preset belongs to (ConfigError naming model.preset when unknown)."""
    try:
        return _BY_PRESET[preset]
    except KeyError:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (presets: {', '.join(PRESETS)})") from None


def family_of_pipeline(class_name: str) -> ModelFamily | None:
    """The family whose diffusers pipeline class is `class_name` (None: not one we train)."""
    return _BY_PIPELINE.get(class_name)


PIPELINE_CLASSES = tuple(_BY_PIPELINE)
