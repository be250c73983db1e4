"""The embedded digits default: data, the class-conditional SD3 teacher, the shipped checkpoint, the evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdm_train import digits
from cdm_train.digits.eval import EVAL_GUIDANCE_SCALE, DigitsEvaluator, frechet_distance, generate
from cdm_train.models.class_label import ClassLabelAdapter


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny models are latency-bound: extra threads only contend with the other test workers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def split():
    return digits.load_digits_split()


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator.load_or_train(save=False)


def test_constants():
    assert digits.NUM_CLASSES == 10
    assert digits.NULL_CLASS == 10
    assert tuple(digits.LATENT_SHAPE) == (1, 8, 8)


def test_split_shapes_ranges_and_determinism(split):
    assert split.train_images.shape == (1797 - digits.HELDOUT_SIZE, 1, 8, 8)
    assert split.heldout_images.shape == (digits.HELDOUT_SIZE, 1, 8, 8)
    for images in (split.train_images, split.heldout_images):
        assert images.dtype == torch.float32
        assert images.min() == -1.0 and images.max() == 1.0
    # Stratified: every class holds 9-11% of the held-out split.
    counts = torch.bincount(split.heldout_labels, minlength=10).float() / digits.HELDOUT_SIZE
    assert counts.min() > 0.09 and counts.max() < 0.11
    again = digits.load_digits_split()
    assert torch.equal(again.heldout_images, split.heldout_images)
    pixels = digits.images_to_pixels(split.train_images[:5])
    assert torch.allclose(digits.pixels_to_images(pixels), split.train_images[:5])


def test_class_sampler_balanced_and_seeded():
    labels = digits.class_sampler(35, torch.Generator().manual_seed(3), "cpu")
    assert labels.shape == (35,) and labels.dtype == torch.int64
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 4 and labels.max() < digits.NUM_CLASSES
    again = digits.class_sampler(35, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(labels, again)


def test_model_through_class_label_adapter():
    model = digits.build_digits_model(seed=0)
    adapter = ClassLabelAdapter(digits.NULL_CLASS)
    x = torch.randn(6, *digits.LATENT_SHAPE)
    sigma = torch.rand(6)
    labels = torch.tensor([0, 1, 2, 3, 9, 4])
    with torch.no_grad():
        v = adapter(model, x, sigma, labels)
        v_null = adapter(model, x, sigma, adapter.uncond(labels))
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(v, v_null)  # the class reaches the output
    same = digits.build_digits_model(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_checkpoint_round_trip_and_missing(tmp_path):
    model = digits.train_teacher(tmp_path / "t.pt", steps=2, progress=False, batch_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.pt"]  # no temp file left behind
    loaded = digits.load_teacher(tmp_path / "t.pt")
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 500.0), torch.tensor([1, 2, 10])
    # The round trip is exact on the weights; the forward outputs are compared at fp32 tolerance (a busy
    # machine can run the two forwards down different CPU kernel paths: once seen differing at 6e-8).
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), loaded(x, t, y), rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="train-teacher"):
        digits.load_teacher(tmp_path / "absent.pt")


def test_shipped_teacher_reaches_class_accuracy(evaluator):
    """Shortened check: 20 samples per class (the demo uses 100) at 50 CFG steps."""
    teacher = digits.load_teacher()
    images, labels = generate(teacher, 50, EVAL_GUIDANCE_SCALE, per_class=20, seed=0)
    assert images.shape == (200, 1, 8, 8)
    assert evaluator.evaluate(images, labels)["class_accuracy"] >= 0.90


def test_evaluator_sanity(evaluator, split):
    assert evaluator.classifier_heldout_accuracy >= 0.97
    floor = evaluator.real_data_floor()
    noise = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_scores = evaluator.evaluate(noise, torch.arange(1000) % 10)
    assert floor["fd"] < 0.05 * noise_scores["fd"]
    assert noise_scores["class_accuracy"] < 0.3
    real = evaluator.evaluate(split.heldout_images, split.heldout_labels)
    assert real["fd"] < 1e-6 and real["class_accuracy"] == evaluator.classifier_heldout_accuracy


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert abs(frechet_distance(a, a)) < 1e-8
    # Same covariance, mean shifted by 2 along one axis: FD ~= 4.
    assert abs(frechet_distance(a, a + np.array([2.0, 0, 0])) - 4.0) < 1e-6
    # N(0, I) vs N(0, 4 I) in 3-d: 3 * (1 + 4 - 2 * 2) = 3.
    b = rng.normal(size=(4000, 3)) * 2.0
    assert abs(frechet_distance(a, b) - 3.0) < 0.3
