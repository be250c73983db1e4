"""Plain-PyTorch reference implementations: the specification every backend matches."""

from .euler import euler_extrapolate, euler_step
from .flow_matching import flow_matching_loss
from .philox import philox_randn
from .renoise import draw_noise, predict_x0_renoise, renoise
from .score_difference import cfg_loss, dm_loss, weighted_score_difference

__all__ = [
    "euler_extrapolate",
    "euler_step",
    "renoise",
    "predict_x0_renoise",
    "draw_noise",
    "philox_randn",
    "dm_loss",
    "cfg_loss",
    "weighted_score_difference",
    "flow_matching_loss",
]
