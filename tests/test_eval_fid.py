"""`cdm-train eval`: the shared Frechet distance, Inception / CLIP loading, reference statistics and the cache,
prompt-derived seeds, and the command end to end on the tiny SD3 pipeline (random-init Inception-shaped and CLIP
networks; the numbers mean nothing, the plumbing and the formulas are what is checked)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cdm_train.cli import main
from cdm_train.evaluation.errors import EvalInputError
from cdm_train.evaluation.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats

FEATURE_DIM = 24


def _old_digits_frechet(feats_a, feats_b):
    """cdm_train.digits.eval.frechet_distance as it was before the move (commit a5a89a0), verbatim."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, q = np.linalg.eigh(cov_a)
    root_a = (q * np.sqrt(np.clip(w, 0.0, None))) @ q.T
    middle = root_a @ cov_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt)


def _features(n, d, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix * scale + rng.normal(size=d)


def _scipy_fid(a, b):
    """pytorch-fid's formula (scipy.linalg.sqrtm), an independent float64 computation."""
    from scipy import linalg

    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _torchmetrics():
    """torchmetrics, importable here only with torch-fidelity's Inception resolved without torchvision."""
    from cdm_train.evaluation.inception import torch_fidelity_inception_class

    try:
        torch_fidelity_inception_class()
    except EvalInputError:
        pass  # no torch-fidelity: torchmetrics imports without it
    try:
        import torchmetrics  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"torchmetrics is not importable here: {exc}")


# ------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_agrees_with_scipy_and_torchmetrics_formulas():
    a, b = _features(600, FEATURE_DIM, 0), _features(500, FEATURE_DIM, 1, scale=1.5)
    ours = frechet_distance(a, b)
    assert ours > 1.0
    assert ours == pytest.approx(_scipy_fid(a, b), rel=1e-9)
    _torchmetrics()
    from torchmetrics.image.fid import _compute_fid

    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    theirs = float(_compute_fid(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2))))
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = _features(400, FEATURE_DIM, 2)
    assert abs(frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    shifts = [frechet_distance(a, a + t) for t in (0.1, 0.5, 2.0)]
    for t, fd in zip((0.1, 0.5, 2.0), shifts):  # same covariance: FD = |shift|^2 = D t^2
        assert fd == pytest.approx(FEATURE_DIM * t * t, rel=1e-6)
    # Fewer samples than dimensions (1,000 Inception samples are 2,048-d): singular covariances, still finite,
    # non-negative, and zero against itself (no eps offset, no complex residue).
    few = _features(10, FEATURE_DIM, 3)
    assert abs(frechet_distance(few, few)) < 1e-9 * np.trace(np.cov(few, rowvar=False))
    assert frechet_distance(few, _features(12, FEATURE_DIM, 4)) > 0
    with pytest.raises(ValueError, match="mu_b"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_digits_evaluator_uses_the_shared_frechet_with_unchanged_figures():
    """The digits classifier's 64-d features have dead ReLU units (~28 always 0): singular covariances. The shared
    implementation zeroes round-off eigenvalues before their square root, so it moves the old figure by ~1e-5 (the
    demo reports FD to 2 decimals) and only towards exactness: a set against itself is ~0 where the old code left
    sqrt(round-off) per dead unit."""
    import cdm_train.digits.eval as digits_eval
    import cdm_train.evaluation.frechet as shared

    assert digits_eval.frechet_distance is shared.frechet_distance
    for seed in range(3):  # digits-like: 64-d features spanning 36 dimensions, 1,000 vs 797 samples
        a, b = _features(1000, 36, seed), _features(797, 36, seed + 10, scale=1.1)
        rot = np.linalg.qr(np.random.default_rng(seed).normal(size=(64, 64)))[0][:36]  # FD is rotation-invariant
        ra, rb = a @ rot, b @ rot
        assert frechet_distance(ra, rb) == pytest.approx(_old_digits_frechet(ra, rb), abs=1e-4)
        assert frechet_distance(ra, rb) == pytest.approx(_scipy_fid(a, b), rel=1e-9)
        assert abs(frechet_distance(ra, ra)) < 1e-10 < 1e-7 < abs(_old_digits_frechet(ra, ra))


# ------------------------------------------------------------------------------------------ networks
class _TinyInception(torch.nn.Module):
    """The TorchScript Inception's call contract (float images in [0, 255], return_features=True -> (N, D))
    on a few random layers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, FEATURE_DIM)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d((img - 128.0) / 128.0, 16)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1)
        return self.fc(x)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "tiny-inception.pt"
    torch.jit.script(_TinyInception().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .test_prompts import WORDS, _tokenizer

    torch.manual_seed(0)
    text = dict(vocab_size=len(WORDS) + 3, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    root = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(root)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=_tokenizer(16)).save_pretrained(root)
    return root


def _random_images(n, seed, size=8, offset=0):
    rng = np.random.default_rng(seed)
    return [np.clip(rng.integers(0, 200, (size, size, 3)) + offset, 0, 255).astype(np.uint8) for _ in range(n)]


def test_torchscript_inception_features_and_bad_files(inception_file, tmp_path):
    from cdm_train.evaluation.inception import InceptionFeatures, resize_for_inception

    feats = InceptionFeatures(inception_file)
    assert feats.format == "torchscript"
    images = _random_images(5, 0) + [_random_images(1, 1, size=20)[0]]  # mixed sizes: each resized to 299
    out = feats(images)
    assert out.shape == (6, FEATURE_DIM) and out.dtype == np.float64
    net = torch.jit.load(str(inception_file))
    x = torch.from_numpy(resize_for_inception(images[5]))[None]
    assert x.shape == (1, 3, 299, 299)
    with torch.no_grad():
        direct = net(x, return_features=True)[0].double().numpy()
    # batch of 6 vs batch of 1: the CPU matmul may block the reduction differently (seen once at 1e-6)
    np.testing.assert_allclose(out[5], direct, rtol=1e-5, atol=1e-5 * float(np.abs(direct).max()))
    with pytest.raises(EvalInputError, match="does not exist"):
        InceptionFeatures(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a network")
    with pytest.raises(EvalInputError, match="--inception"):
        InceptionFeatures(junk)


@pytest.mark.slow  # ~20 s: the full Inception at 299 x 299 on the CPU (skipped without torch-fidelity, as in CI)
def test_torch_fidelity_weights_give_torchmetrics_fid(tmp_path):
    """A random-init torch-fidelity Inception state dict (the torchmetrics / pytorch-fid weights format): our FID
    through it equals torchmetrics' FrechetInceptionDistance on the same (299-resized) uint8 images."""
    from cdm_train.evaluation import inception

    try:
        cls = inception.torch_fidelity_inception_class()
    except EvalInputError:
        pytest.skip("torch-fidelity is not installed")
    _torchmetrics()
    from torchmetrics.image.fid import FrechetInceptionDistance

    class _RandomInit(cls):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None if state_dict is None else super().load_state_dict(state_dict, *args, **kwargs)

    torch.manual_seed(0)
    mod = __import__(cls.__module__, fromlist=["load_state_dict_from_url"])
    original = mod.load_state_dict_from_url
    mod.load_state_dict_from_url = lambda *a, **k: None  # nothing is downloaded: the layers keep their random init
    try:
        weights = _RandomInit("random", ["2048"]).state_dict()
    finally:
        mod.load_state_dict_from_url = original
    path = tmp_path / "weights-inception-random.pth"
    torch.save(weights, path)
    feats = inception.InceptionFeatures(path)
    assert feats.format == "torch-fidelity"
    real, fake = _random_images(3, 0), _random_images(3, 1, offset=40)
    ours = frechet_distance(feats(real), feats(fake))

    def batch(images):
        return torch.stack([torch.from_numpy(inception.resize_for_inception(im)).round().to(torch.uint8)
                            for im in images])

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    metric.update(batch(real), real=True)
    metric.update(batch(fake), real=False)
    assert ours > 0 and ours == pytest.approx(float(metric.compute()), rel=1e-4)


def test_clip_cosines_agree_with_torchmetrics_clip_score(clip_dir):
    from transformers import CLIPModel

    from cdm_train.evaluation.clip_score import ClipScorer, clip_summary

    scorer = ClipScorer(clip_dir)
    images = _random_images(4, 0)
    prompts = ["a cat", "a red car on the moon", "photo of a blue dog", "the moon " * 20]  # the last is truncated
    cos = scorer.cosines(images, prompts)
    assert cos.shape == (4,) and np.all(np.abs(cos) <= 1 + 1e-9)
    assert not np.allclose(cos, cos[0])
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()  # an independent path: the two projections by hand
    inputs = scorer.processor(text=prompts[:3], images=images[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    img, txt = (t.pooler_output if hasattr(t, "pooler_output") else t for t in (img, txt))
    manual = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1).numpy()
    np.testing.assert_allclose(cos[:3], manual, rtol=1e-5, atol=1e-6)
    summary = clip_summary(cos)
    assert summary["clip_cosine"] == pytest.approx(cos.mean())
    _torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    class _Tensors(torch.nn.Module):  # torchmetrics 1.9 expects transformers 4's tensors from get_*_features
        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *a, **k):
            out = self.clip.get_image_features(*a, **k)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *a, **k):
            out = self.clip.get_text_features(*a, **k)
            return getattr(out, "pooler_output", out)

    metric = CLIPScore(model_name_or_path=lambda: (_Tensors(scorer.model), scorer.processor))
    metric.update([torch.from_numpy(im).permute(2, 0, 1) for im in images[:3]], prompts[:3])
    assert clip_summary(cos[:3])["clip_score"] == pytest.approx(float(metric.compute()), rel=1e-4, abs=1e-4)
    with pytest.raises(EvalInputError, match="--clip"):
        ClipScorer(clip_dir / "nope")


# ------------------------------------------------------------------------------------------ references, seeds
def _write_pngs(folder, images):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


def test_reference_statistics_cache_and_bad_folders(inception_file, tmp_path):
    from cdm_train.evaluation.inception import InceptionFeatures
    from cdm_train.evaluation.references import folder_stats, load_stats

    feats = InceptionFeatures(inception_file)
    ref = _write_pngs(tmp_path / "ref", _random_images(7, 0))
    cache = tmp_path / "cache"
    calls = []

    def counted(images):
        calls.append(len(images))
        return feats(images)

    mu, sigma, info = folder_stats(ref, counted, feats.digest, min_images=5, cache_dir=cache, batch_size=3,
                                   progress=False)
    assert info["cached"] is False and sum(calls) == 7 and info["num_images"] == 7
    direct = gaussian_stats(feats(_random_images(7, 0)))  # PNG round trip is lossless
    np.testing.assert_allclose(mu, direct[0], rtol=1e-5, atol=1e-7)  # float32 network, other batches
    np.testing.assert_allclose(sigma, direct[1], rtol=1e-5, atol=1e-7)
    calls.clear()
    mu2, sigma2, info2 = folder_stats(ref, counted, feats.digest, min_images=5, cache_dir=cache, progress=False)
    assert info2["cached"] is True and calls == []  # the second run reads the cache, no network call
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert load_stats(info["stats_file"])[0].shape == (FEATURE_DIM,)
    # Another network, or a changed image: a different key, recomputed.
    assert folder_stats(ref, counted, "other-net", min_images=5, cache_dir=cache, progress=False)[2]["cached"] is False
    _write_pngs(ref, _random_images(1, 9))
    assert folder_stats(ref, counted, feats.digest, min_images=5, cache_dir=cache, progress=False)[2]["cached"] is False

    with pytest.raises(EvalInputError, match="fewer than"):
        folder_stats(ref, counted, feats.digest, min_images=8, cache_dir=None, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(EvalInputError, match="no images"):
        folder_stats(tmp_path / "empty", counted, feats.digest, min_images=2, cache_dir=None, progress=False)
    bad = _write_pngs(tmp_path / "bad", _random_images(3, 0))
    (bad / "001.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(EvalInputError, match="001.png"):
        folder_stats(bad, counted, feats.digest, min_images=2, cache_dir=None, progress=False)
    with pytest.raises(EvalInputError, match="mu"):
        np.savez(tmp_path / "x.npz", mean=np.zeros(3))
        load_stats(tmp_path / "x.npz")


def test_seeds_come_from_the_prompt_as_the_official_evaluation():
    from cdm_train.evaluation.samplers import assign_prompts, prompt_seed, seeded_noise

    # The official compute_seed_from_prompts([p]): int(md5("||".join([p])).hexdigest(), 16) % 2**32.
    for p in ("a cat", "photo of a blue dog", "é"):
        assert prompt_seed(p) == int(hashlib.md5(p.encode()).hexdigest(), 16) % 2**32
    prompts, seeds = assign_prompts(["a", "b", "c"], 7)
    assert prompts == ["a", "b", "c", "a", "b", "c", "a"]
    assert seeds[3] == (seeds[0] + 7919) % 2**32 and seeds[6] == (seeds[0] + 2 * 7919) % 2**32
    assert len(set(seeds)) == 7
    # One generator per sample: the noise of a sample does not depend on its batch.
    whole = seeded_noise(seeds, (4, 8, 8))
    assert torch.equal(whole[3:5], seeded_noise(seeds[3:5], (4, 8, 8)))


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sd3_text_pipeline_dir(tmp_path_factory):
    """The tiny SD3 with text encoders (tests/helpers.py)."""
    pytest.importorskip("transformers")
    from .helpers import save_tiny_sd3_text_pipeline

    return save_tiny_sd3_text_pipeline(tmp_path_factory.mktemp("sd3-text"))


@pytest.fixture(scope="module")
def trained_run(sd3_text_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-run")
    texts = ["a cat on the moon", "a red car", "photo of a blue dog", "the moon", "a dog", "blue car"]
    (root / "prompts.txt").write_text("\n".join(texts) + "\n")
    emb = root / "emb"
    assert main(["encode-prompts", "--model", str(sd3_text_pipeline_dir), "--prompts", str(root / "prompts.txt"),
                 "--out", str(emb), "--device", "cpu", "--dtype", "float32", "--max-sequence-length", "8"]) == 0
    run = root / "run"
    assert main(["train", "--preset", "sd3-medium", "--set", f"model.path={sd3_text_pipeline_dir}", "--set",
                 f"model.prompt_embeds={emb}", "--set", "model.resolution=64", "--set", "train.batch_size=2",
                 "--set", "schedule.max_steps=3", "--set", "optim.update_ratio=1", "--set", "optim.student_lr=1e-2",
                 "--set", "optim.student_warmup_steps=0", "--set", "optim.ema_decay=0.5", "--steps", "2", "--out",
                 str(run), "--no-progress"]) == 0
    return root


def _eval_args(source, root, inception_file, clip_dir, out, *extra):
    return ["eval", *source, "--prompts", str(root / "prompts.txt"), "--num", "5", "--inception",
            str(inception_file), "--clip", str(clip_dir), "--out", str(out), "--device", "cpu", "--no-progress",
            *extra]


def _metrics(report):
    return [(r["name"], r["fid"], r["clip_score"], r["clip_cosine"]) for r in report["rows"]]


def test_eval_end_to_end_on_the_tiny_sd3(trained_run, sd3_text_pipeline_dir, inception_file, clip_dir, tmp_path,
                                         monkeypatch):
    from PIL import Image

    import cdm_train.evaluation.references as references
    from cdm_train.evaluation.samplers import assign_prompts
    from cdm_train.prompts import read_prompts

    root = trained_run
    ref = _write_pngs(tmp_path / "ref", _random_images(6, 5))
    cache = tmp_path / "cache"
    common = ("--reference", str(ref), "--stats-cache", str(cache))
    ckpt = ("--checkpoint", str(root / "run"))
    first = tmp_path / "a"
    assert main(_eval_args(ckpt, root, inception_file, clip_dir, first, *common, "--batch-size", "2",
                           "--teacher", str(sd3_text_pipeline_dir), "--teacher-steps", "2")) == 0
    report = json.loads((first / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["student", "teacher"]
    student, teacher = report["rows"]
    assert student["steps"] == 4 and student["sigmas"] == [1.0, 0.75, 0.5, 0.25] and student["weights"] == "ema"
    assert teacher["steps"] == 2 and teacher["guidance_scale"] == 4.5
    for row in report["rows"]:
        assert row["num"] == 5 and row["non_finite_samples"] == 0
        assert np.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["clip_score"] <= 100
    assert student["fid"] != teacher["fid"]
    assert report["seeds"] == assign_prompts(read_prompts(root / "prompts.txt"), 5)[1]
    assert report["fid"]["reference"]["cached"] is False and report["fid"]["format"] == "torchscript"
    md = (first / "report.md").read_text()
    assert "| student | 4 |" in md and "| teacher | 2 |" in md
    grid = Image.open(first / "samples.png")
    assert grid.size[0] > grid.size[1] > 0 and (first / "teacher_samples.png").is_file()

    # A second run: the same scores exactly (seeds from the prompts). The reference statistics come from the
    # cache: reading a reference image now would fail.
    monkeypatch.setattr(references, "read_rgb", lambda p: (_ for _ in ()).throw(AssertionError(f"read {p}")))
    second = tmp_path / "b"
    assert main(_eval_args(ckpt, root, inception_file, clip_dir, second, *common, "--batch-size", "2")) == 0
    again = json.loads((second / "report.json").read_text())
    assert again["fid"]["reference"]["cached"] is True
    assert _metrics(again)[0] == _metrics(report)[0] and again["seeds"] == report["seeds"]

    # The exported pipeline samples the same images (same noise, schedule, shift): the same scores, up to the
    # uint8 rounding of decoded pixels that export + diffusers' own sampler can move by one level.
    export = tmp_path / "export"
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(export), "--dtype", "fp32"]) == 0
    third = tmp_path / "c"
    assert main(_eval_args(("--pipeline", str(export)), root, inception_file, clip_dir, third, *common)) == 0
    piped = json.loads((third / "report.json").read_text())
    assert piped["rows"][0]["sigmas"] == [1.0, 0.75, 0.5, 0.25]
    assert piped["rows"][0]["fid"] == pytest.approx(student["fid"], rel=1e-4)
    assert piped["rows"][0]["clip_cosine"] == pytest.approx(student["clip_cosine"], abs=1e-5)

    # Precomputed statistics (the cache file is one) give the folder's FID; another batch size (default 8, one
    # batch) samples the same images (one generator per sample): the same scores up to the float32 round-off of
    # batched matmuls.
    fourth = tmp_path / "d"
    assert main(_eval_args(ckpt, root, inception_file, clip_dir, fourth, "--reference-stats",
                           report["fid"]["reference"]["stats_file"])) == 0
    other = json.loads((fourth / "report.json").read_text())["rows"][0]
    assert other["fid"] == pytest.approx(student["fid"], rel=1e-4)
    assert other["clip_cosine"] == pytest.approx(student["clip_cosine"], abs=1e-5)


def test_eval_bad_inputs_exit_2(trained_run, inception_file, clip_dir, tmp_path, capsys):
    root = trained_run
    ckpt = ("--checkpoint", str(root / "run"))
    ref = _write_pngs(tmp_path / "ref", _random_images(6, 5))
    (tmp_path / "empty").mkdir()
    cases = {
        "does not exist": _eval_args(ckpt, root, tmp_path / "missing.pt", clip_dir, tmp_path / "o", "--reference",
                                     str(ref)),
        "fewer than --num": _eval_args(ckpt, root, inception_file, clip_dir, tmp_path / "o", "--reference", str(ref),
                                       "--max-reference", "3"),
        "no images": _eval_args(ckpt, root, inception_file, clip_dir, tmp_path / "o", "--reference",
                                str(tmp_path / "empty")),
        "exactly one of --reference": _eval_args(ckpt, root, inception_file, clip_dir, tmp_path / "o"),
        "statistics": _eval_args(ckpt, root, inception_file, clip_dir, tmp_path / "o", "--reference-stats",
                                 str(tmp_path / "nope.npz")),
    }
    np.savez(tmp_path / "wrong-dim.npz", mu=np.zeros(3), sigma=np.eye(3))
    cases["3-d statistics"] = _eval_args(ckpt, root, inception_file, clip_dir, tmp_path / "o", "--reference-stats",
                                         str(tmp_path / "wrong-dim.npz"))
    for message, args in cases.items():
        capsys.readouterr()
        assert main(args) == 2, message
        err = capsys.readouterr().err
        assert message in err or (message == "statistics" and "does not exist" in err), (message, err)
    assert not (tmp_path / "o" / "report.json").exists()


def _eval_worker(rank: int, world: int, store: str, kwargs: dict) -> None:
    import os

    import torch.distributed as dist

    from cdm_train.evaluation.runner import EvalOptions, evaluate

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        report = evaluate(EvalOptions(**kwargs))
        assert (report != {}) == (rank == 0)  # only rank 0 scores and writes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s: two spawned processes import torch and diffusers
def test_eval_under_two_processes_matches_one(trained_run, inception_file, clip_dir, tmp_path):
    """torchrun-style sharding (gloo, CPU): ranks sample every other index, rank 0 gathers features and cosines;
    the seeds follow the sample, so the scores are those of one process (up to batched float32 round-off)."""
    from .test_distributed import _spawn

    root = trained_run
    ref = _write_pngs(tmp_path / "ref", _random_images(6, 5))
    kwargs = dict(prompts=str(root / "prompts.txt"), checkpoint=str(root / "run"), num=5, inception=str(inception_file),
                  reference=str(ref), stats_cache="", clip=str(clip_dir), device="cpu", progress=False, batch_size=2)
    from cdm_train.evaluation.runner import EvalOptions, evaluate

    single = evaluate(EvalOptions(**kwargs, out=str(tmp_path / "one")))
    _spawn(_eval_worker, 2, {**kwargs, "out": str(tmp_path / "two")})
    double = json.loads((tmp_path / "two" / "report.json").read_text())
    assert double["world_size"] == 2 and double["seeds"] == single["seeds"] and double["rows"][0]["num"] == 5
    assert double["rows"][0]["fid"] == pytest.approx(single["rows"][0]["fid"], rel=1e-4)
    assert double["rows"][0]["clip_cosine"] == pytest.approx(single["rows"][0]["clip_cosine"], abs=1e-5)
    assert (tmp_path / "two" / "samples.png").is_file()
