"""FID features from a LOCAL Inception-v3 file (nothing is downloaded, no network definition is written here).

Two formats, told apart by their content:

- TorchScript, ``inception-2015-12-05.pt``: the TensorFlow FID Inception as NVIDIA's StyleGAN2-ADA/StyleGAN3
  metrics and clean-fid (the official CDM evaluation's FID library) load it with ``torch.jit.load``. Needs
  nothing beyond torch. Called as ``net(images, return_features=True)`` on float images in [0, 255]:
  (N, 2048) pool features. Any TorchScript module with that call contract is accepted (the tests use a
  small random one).
- torch-fidelity / torchmetrics state dict, ``weights-inception-2015-12-05-6726825d.pth``: loaded into
  torch-fidelity's own ``FeatureExtractorInceptionV3`` (the network torchmetrics' FrechetInceptionDistance
  runs), called on uint8 images; needs ``pip install torch-fidelity``.

Pre-processing, the same for both and for generated and reference images: RGB, resized to 299 x 299 with
PIL's bicubic filter per channel in float (clean-fid's "clean" mode), values in [0, 255].
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import EvalInputError

INCEPTION_SIZE = 299


def resize_for_inception(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, size, size) float32 in [0, 255]: PIL bicubic on each channel in float ('F')
    mode, as clean-fid does, so no second uint8 rounding happens after the resize."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize(
        (size, size), resample=Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels).clip(0.0, 255.0).astype(np.float32)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (the statistics cache keys on the network actually used)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:  # torch.save archives hold data.pkl only; TorchScript adds code/ + constants
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def torch_fidelity_inception_class():
    """torch-fidelity's FeatureExtractorInceptionV3.

    torch-fidelity's package __init__ imports its CLIP extractor, which needs torchvision; the Inception
    module itself needs only torch. Where torchvision cannot be imported (e.g. no torchvision build matches
    the installed torch), the submodule is imported under a bare package object instead of that __init__.
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    except ImportError as exc:
        first_error = exc
    spec = importlib.util.find_spec("torch_fidelity") if "torch_fidelity" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
        try:
            return importlib.import_module(name).FeatureExtractorInceptionV3
        except ImportError as exc:
            del sys.modules["torch_fidelity"]
            first_error = exc
    raise EvalInputError("--inception: a state-dict weights file needs torch-fidelity's Inception (pip install "
                         "torch-fidelity), or pass the TorchScript inception-2015-12-05.pt, which needs nothing "
                         f"else ({first_error})")


class InceptionFeatures:
    """uint8 RGB images -> (N, D) float64 FID features, with the network of a local file."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise EvalInputError(f"--inception: weights file {str(self.path)!r} does not exist")
        self.device = torch.device(device)
        self.digest = file_digest(self.path)
        if _is_torchscript(self.path):
            self.format = "torchscript"
            try:
                with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the published file is one
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.net = torch.jit.load(str(self.path), map_location=self.device).eval()
            except Exception as exc:  # torch raises RuntimeError subclasses with long C++ traces
                raise EvalInputError(f"--inception: {str(self.path)!r} is not a loadable TorchScript file "
                                     f"({str(exc).splitlines()[0]})") from None
        else:
            self.format = "torch-fidelity"
            self.net = self._load_state_dict_network()

    def _load_state_dict_network(self) -> torch.nn.Module:
        cls = torch_fidelity_inception_class()
        try:
            torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EvalInputError(f"--inception: {str(self.path)!r} is neither a TorchScript Inception nor a "
                                 f"weights state dict ({str(exc).splitlines()[0]})") from None
        try:
            net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(self.path))
        except RuntimeError as exc:  # load_state_dict: missing / unexpected keys, shape mismatches
            raise EvalInputError(f"--inception: {str(self.path)!r} does not hold torch-fidelity's "
                                 f"Inception-v3 weights ({str(exc).splitlines()[0]})") from None
        return net.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """A batch of (H, W, 3) uint8 images (any sizes) -> (N, D) float64 features."""
        x = torch.from_numpy(np.stack([resize_for_inception(im) for im in images])).to(self.device)
        if self.format == "torchscript":
            out = self.net(x, return_features=True)
        else:  # torch-fidelity checks for uint8 input; the float resize is rounded once here
            out = self.net(x.round().clamp(0, 255).to(torch.uint8))[0]
        out = out.reshape(len(images), -1).double().cpu().numpy()
        if not np.isfinite(out).all():
            raise EvalInputError(f"--inception: {str(self.path)!r} produced non-finite features")
        return out
