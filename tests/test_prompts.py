"""`cdm-train encode-prompts` with a tiny random-init SD3 pipeline built offline, and the sharded dataset.

Untested without real weights: the real CLIP/T5 tokenizers and encoders (only their interface is
exercised, through the pipeline's own encode_prompt) and embedding quality. Flux's encode path: tests/test_flux.py.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="encode-prompts tests need transformers (a [dev] extra)")

from cdm_train.cli import main  # noqa: E402
from cdm_train.prompts import PromptDataError, PromptEmbeds, official_prompt_rows, read_prompts  # noqa: E402

WORDS = ["a", "cat", "dog", "on", "the", "moon", "red", "photo", "of", "blue", "car", "é"]


def _tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_len)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A StableDiffusion3Pipeline directory: 2 tiny CLIP text encoders with projection, a tiny T5, tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    vocab = len(WORDS) + 3

    def clip(hidden):
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16,
                                                          num_hidden_layers=1, num_attention_heads=2,
                                                          max_position_embeddings=77, projection_dim=hidden,
                                                          pad_token_id=0, bos_token_id=1, eos_token_id=2))

    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2))
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=clip(8), tokenizer=_tokenizer(77), text_encoder_2=clip(8),
                                    tokenizer_2=_tokenizer(77), text_encoder_3=t5, tokenizer_3=_tokenizer(32))
    root = tmp_path_factory.mktemp("sd3")
    pipe.save_pretrained(root)
    return root


def test_encode_prompts_writes_shards_that_the_dataset_reads(sd3_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    texts = ["a cat on the moon", "a red car", "photo of a blue dog", "é", "the moon", "a dog"]
    prompts.write_text("\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts) + "\n")
    out = tmp_path / "emb"
    assert main(["encode-prompts", "--model", str(sd3_dir), "--prompts", str(prompts), "--out", str(out),
                 "--batch-size", "2", "--shard-rows", "4", "--device", "cpu", "--dtype", "float32",
                 "--max-sequence-length", "16"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["num_prompts"] == 6 and [s["rows"] for s in index["shards"]] == [4, 2]
    data = PromptEmbeds(out)
    rows = data.rows([0, 5, 3])
    # SD3: 77 CLIP tokens + 16 T5 tokens; width = the T5 width (CLIP L+G padded up to it); pooled = L + G
    assert rows["encoder_hidden_states"].shape == (3, 77 + 16, 16)
    assert rows["pooled_projections"].shape == (3, 16)
    # the same rows as encoding those prompts directly through the pipeline's encode_prompt
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), transformer=None, vae=None)
    direct, _, pooled, _ = pipe.encode_prompt([texts[0], texts[5], texts[3]], None, None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(rows["encoder_hidden_states"], direct)
    torch.testing.assert_close(rows["pooled_projections"], pooled)
    null, _, null_pooled, _ = pipe.encode_prompt([""], None, None, device="cpu", do_classifier_free_guidance=False,
                                                 max_sequence_length=16)
    torch.testing.assert_close(data.null()["encoder_hidden_states"], null)
    torch.testing.assert_close(data.null()["pooled_projections"], null_pooled)
    # plain text prompt files work too
    plain = tmp_path / "p.txt"
    plain.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(plain) == ["a cat", "a dog"]


def test_sd3_medium_preset_streams_the_directory(sd3_dir, tmp_path):
    from cdm_train.encode import encode_prompts
    from cdm_train.prompts import StreamingPromptBank

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\nthe moon\n")
    out = encode_prompts(sd3_dir, prompts, tmp_path / "emb", device="cpu", dtype="float32", max_sequence_length=8)
    bank = StreamingPromptBank(out, torch.device("cpu"))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = bank(5, g1), bank(5, g2)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same generator (seed, rank, step) -> same rows
    assert a["encoder_hidden_states"].shape == (5, 77 + 8, 16)


def test_official_prompt_rows_walk_permutations_without_replacement():
    # 11 rows, global batch 2 x 2 = 4: two slices per permutation, the 3 left over are dropped (official sampler).
    n, world, batch = 11, 2, 2
    slices = [[r for rank in range(world) for r in official_prompt_rows(n, 7, step, rank, world, batch)]
              for step in range(6)]
    for perm in range(3):  # steps 2e, 2e + 1 come from permutation e: 8 distinct rows
        rows = slices[2 * perm] + slices[2 * perm + 1]
        assert len(set(rows)) == 8 and all(0 <= r < n for r in rows)
    assert slices[0] != slices[2]  # a fresh permutation per pass
    assert official_prompt_rows(n, 7, 3, 1, world, batch) == slices[3][2:]  # a pure function of (step, rank)
    assert official_prompt_rows(n, 8, 3, 1, world, batch) != slices[3][2:]  # and of the seed
    # Fewer rows than a global batch: every row appears in each batch (whole permutations concatenated).
    small = [r for rank in range(3) for r in official_prompt_rows(4, 0, 5, rank, 3, 2)]
    assert len(small) == 6 and set(small) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="rank"):
        official_prompt_rows(4, 0, 0, 3, 3, 2)


def test_bad_files_fail_with_a_clear_message(sd3_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptDataError, match="no prompts"):
        read_prompts(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(PromptDataError, match="not UTF-8"):
        read_prompts(latin)
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(PromptDataError, match=r"b.jsonl:2"):
        read_prompts(bad_json)
    assert main(["encode-prompts", "--model", str(sd3_dir), "--prompts", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["encode-prompts", "--model", str(tmp_path), "--prompts", str(bad_json), "--out",
                 str(tmp_path / "o")]) == 2

    from cdm_train.encode import encode_prompts

    good = tmp_path / "g.txt"
    good.write_text("a cat\na dog\nthe moon\n")
    out = encode_prompts(sd3_dir, good, tmp_path / "emb", device="cpu", dtype="float32", max_sequence_length=8,
                         shard_rows=2, batch_size=1)
    index = json.loads((out / "index.json").read_text())
    # a shard from another encoding (different T5 length) is caught by its shape
    other = encode_prompts(sd3_dir, good, tmp_path / "emb2", device="cpu", dtype="float32", max_sequence_length=4,
                           shard_rows=2, batch_size=1)
    (out / "shard-00001.safetensors").write_bytes((other / "shard-00001.safetensors").read_bytes())
    with pytest.raises(PromptDataError, match="shards from different encodings"):
        PromptEmbeds(out)
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(PromptDataError, match="is missing"):
        PromptEmbeds(out)
    (out / "index.json").unlink()
    with pytest.raises(PromptDataError, match="no index.json"):
        PromptEmbeds(out)
    assert index["num_prompts"] == 3


def test_sd3_medium_preset_trains_from_an_embeddings_directory(sd3_dir, tmp_path):
    from cdm_train.config import make_config
    from cdm_train.encode import encode_prompts
    from cdm_train.models.sd3 import TINY_ARCH
    from cdm_train.models.sd3 import sd3_from_arch as _sd3_from_arch
    from cdm_train.trainer import Trainer

    model = tmp_path / "model"
    _sd3_from_arch(dict(TINY_ARCH, pooled_projection_dim=16), seed=0).save_pretrained(model / "transformer")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\nthe moon\n")
    emb = encode_prompts(sd3_dir, prompts, tmp_path / "emb", device="cpu", dtype="float32", max_sequence_length=8)
    cfg = make_config("sd3-medium", overrides=[f"model.path={model}", f"model.prompt_embeds={emb}",
                                               "model.resolution=64", "train.batch_size=2", "schedule.max_steps=2",
                                               f"train.out_dir={tmp_path / 'run'}", "train.progress=false",
                                               "train.tensorboard=false", "train.steps=2", "train.log_every=1"])
    tr = Trainer(cfg)
    tr.train()
    assert [r["step"] for r in tr.history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss_fake"])) for r in tr.history)
