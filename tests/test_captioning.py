"""Captioning: the decoder block against PyTorch's, masking, cached vs uncached generation, beam
search, the tokenizer, caption datasets and bad input, and a tiny run through the engine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from vit.captions import (
    CaptionData,
    CaptionDataset,
    Tokenizer,
    bleu_scores,
    cider_d,
    cross_attention_maps,
    load_caption_data,
    load_flickr8k,
    make_shapes,
    normalize,
    read_flickr8k_captions,
)
from vit.layers import DecoderBlock
from vit.models import CaptioningTransformer, create_model

TINY = dict(
    depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=4, decoder_depth=2, max_len=32
)


def tiny_captioner(vocab_size: int = 40, seed: int = 0, **kw) -> CaptioningTransformer:
    torch.manual_seed(seed)
    model = create_model("caption_mini_patch8_32", vocab_size=vocab_size, **{**TINY, **kw})
    return model.eval()


# ----------------------------------------------------------------------------------------------
# DecoderBlock == torch.nn.TransformerDecoderLayer
# ----------------------------------------------------------------------------------------------
def _copy_into_ours(ref: nn.TransformerDecoderLayer, ours: DecoderBlock) -> None:
    d = ref.linear1.in_features
    with torch.no_grad():
        ours.self_attn.to_qkv.weight.copy_(ref.self_attn.in_proj_weight)  # [q; k; v] rows
        ours.self_attn.to_qkv.bias.copy_(ref.self_attn.in_proj_bias)
        ours.self_attn.to_out.load_state_dict(ref.self_attn.out_proj.state_dict())
        ours.cross_attn.to_q.weight.copy_(ref.multihead_attn.in_proj_weight[:d])
        ours.cross_attn.to_q.bias.copy_(ref.multihead_attn.in_proj_bias[:d])
        ours.cross_attn.to_kv.weight.copy_(ref.multihead_attn.in_proj_weight[d:])
        ours.cross_attn.to_kv.bias.copy_(ref.multihead_attn.in_proj_bias[d:])
        ours.cross_attn.to_out.load_state_dict(ref.multihead_attn.out_proj.state_dict())
        ours.mlp.fc1.load_state_dict(ref.linear1.state_dict())
        ours.mlp.fc2.load_state_dict(ref.linear2.state_dict())
        for i in (1, 2, 3):
            getattr(ours, f"norm{i}").load_state_dict(getattr(ref, f"norm{i}").state_dict())


@pytest.mark.parametrize("padding", [False, True])
def test_decoder_block_matches_torch_decoder_layer(padding: bool) -> None:
    torch.manual_seed(0)
    d, heads, eps, t, s = 32, 4, 1e-5, 7, 9
    ref = nn.TransformerDecoderLayer(
        d,
        heads,
        dim_feedforward=64,
        dropout=0.0,
        activation="gelu",
        layer_norm_eps=eps,
        batch_first=True,
        norm_first=True,
    ).eval()
    ours = DecoderBlock(d, num_heads=heads, mlp_ratio=2.0, norm_eps=eps).eval()
    _copy_into_ours(ref, ours)
    x, memory = torch.randn(3, t, d), torch.randn(3, s, d)
    causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # PyTorch: True = may NOT attend
    pad = mem_pad = None
    if padding:
        pad = torch.zeros(3, t, dtype=torch.bool)
        # Right padding (as in batches of captions): with left padding the first query would see
        # no key at all and both implementations return NaN there.
        pad[0, 5:] = True
        pad[1, 3:] = True
        mem_pad = torch.zeros(3, s, dtype=torch.bool)
        mem_pad[2, 6:] = True
    expected = ref(
        x, memory, tgt_mask=causal, tgt_key_padding_mask=pad, memory_key_padding_mask=mem_pad
    )
    got = ours(x, memory, padding_mask=pad, memory_padding_mask=mem_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decoder_block_memory_padding_hides_memory_rows() -> None:
    torch.manual_seed(0)
    block = DecoderBlock(16, num_heads=2).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    mem_pad = torch.zeros(2, 8, dtype=torch.bool)
    mem_pad[:, 5:] = True
    changed = memory.clone()
    changed[:, 5:] = torch.randn(2, 3, 16) * 10
    a = block(x, memory, memory_padding_mask=mem_pad)
    b = block(x, changed, memory_padding_mask=mem_pad)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(block(x, memory), block(x, changed))  # without the mask it matters


# ----------------------------------------------------------------------------------------------
# Masking in the captioner
# ----------------------------------------------------------------------------------------------
def test_causal_masking_future_tokens_do_not_change_the_past() -> None:
    model = tiny_captioner()
    images = torch.randn(2, 3, 16, 16)
    tokens = torch.randint(4, 40, (2, 10))
    base = model(images, tokens)
    for t in range(9):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 36 + 4
        out = model(images, changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_padding_mask_hides_padding_tokens() -> None:
    model = tiny_captioner()
    images = torch.randn(2, 3, 16, 16)
    tokens = torch.randint(4, 40, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[:, :3] = True  # left padding: later tokens would see these without the mask
    changed = tokens.clone()
    changed[:, :3] = torch.randint(4, 40, (2, 3))
    a = model(images, tokens, padding_mask=pad)
    b = model(images, changed, padding_mask=pad)
    torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(model(images, tokens)[:, 3:], model(images, changed)[:, 3:])


def test_right_padding_leaves_real_positions_unchanged() -> None:
    model = tiny_captioner()
    images = torch.randn(2, 3, 16, 16)
    tokens = torch.randint(4, 40, (2, 6))
    padded = torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    mask = padded == 0
    torch.testing.assert_close(
        model(images, padded, padding_mask=mask)[:, :6], model(images, tokens), atol=1e-6, rtol=0
    )


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes16() -> tuple[CaptionDataset, Tokenizer]:
    data = make_shapes(512, img_size=16, seed=0)
    tok = Tokenizer.build(c for caps in data.captions for c in caps)
    return CaptionDataset(data, tok, max_len=32, img_size=16), tok


@pytest.fixture(scope="module")
def trained_model(shapes16) -> CaptioningTransformer:
    """A tiny captioner trained for a few seconds: its captions vary, end with <eos> at different
    steps, and greedy and beam search disagree (a fresh model repeats one token). float64, so
    that cached and uncached arithmetic cannot flip an argmax by rounding."""
    ds, tok = shapes16
    model = tiny_captioner(vocab_size=len(tok)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, tokens = normalize(ds.data.images), ds.tokens
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(ds), (32,), generator=g)
        logits = model(images[idx], tokens[idx, :-1])
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[idx, 1:].flatten(), ignore_index=tok.pad_id
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().double()


@pytest.fixture(scope="module")
def images(shapes16) -> torch.Tensor:
    return normalize(make_shapes(8, img_size=16, seed=99).images).double()


def test_greedy_cached_equals_uncached(trained_model, images) -> None:
    cached = trained_model.generate(images, 20)
    uncached = trained_model.generate(images, 20, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 8  # real captions, not one repeated token
    lengths = (cached == trained_model.config.eos_id).int().argmax(1)
    assert (cached == trained_model.config.eos_id).any(1).all() and len(set(lengths.tolist())) > 1


@pytest.mark.parametrize("beam_size", [2, 4])
def test_beam_cached_equals_uncached(trained_model, images, beam_size: int) -> None:
    cached = trained_model.generate(images, 20, beam_size=beam_size)
    uncached = trained_model.generate(images, 20, beam_size=beam_size, use_cache=False)
    assert torch.equal(cached, uncached)


def test_beam_size_one_is_greedy(trained_model, images) -> None:
    greedy = trained_model.generate(images, 20)
    memory = trained_model.forward_memory(images)
    with torch.no_grad():
        for use_cache in (True, False):
            beam = trained_model._beam_search(
                memory, 20, 1, use_cache
            )  # generate() sends k=1 to greedy
            assert torch.equal(beam, greedy)


def test_beam_search_is_exact_when_the_beam_holds_every_prefix(trained_model, images) -> None:
    # With beam_size = vocabulary size and two steps nothing is pruned, so the result must be the
    # most likely two-token continuation, found here by enumerating all of them (ranked by the
    # summed log-probability: length_penalty 0).
    v, cfg = trained_model.config.vocab_size, trained_model.config
    beam = trained_model.generate(images, 2, beam_size=v, length_penalty=0.0)
    bos = torch.full((len(images), 1), cfg.bos_id)
    with torch.no_grad():
        first = trained_model(images, bos)[:, -1].log_softmax(-1)  # (B, V)
        second = torch.stack(
            [
                trained_model(images, torch.cat([bos, torch.full_like(bos, a)], 1))[:, -1]
                for a in range(v)
            ],
            dim=1,
        ).log_softmax(-1)  # (B, V, V)
    total = first[:, :, None] + second
    total[:, cfg.eos_id, :] = float("-inf")  # after <eos> only <pad> follows, at no cost
    total[:, cfg.eos_id, cfg.pad_id] = first[:, cfg.eos_id]
    best = total.flatten(1).argmax(1)
    expected = torch.stack([best // v, best % v], dim=1)
    assert torch.equal(beam, expected)


def test_generation_output_format(trained_model, images) -> None:
    ids = trained_model.generate(images, 20)
    cfg = trained_model.config
    for row in ids.tolist():
        if cfg.eos_id in row:
            after = row[row.index(cfg.eos_id) + 1 :]
            assert all(t == cfg.pad_id for t in after)
        assert cfg.bos_id not in row


def test_generate_and_decode_refuse_bad_arguments() -> None:
    model = tiny_captioner()
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="max_len must be an integer in \\[1, 31\\]"):
        model.generate(images, 32)
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(images, 5, beam_size=0)
    with pytest.raises(ValueError, match="longer than the model's max_len=32"):
        model(images, torch.ones(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(images, torch.ones(1, 5))


def test_caption_variants_and_options() -> None:
    model = create_model("caption_mini_patch8_32", vocab_size=30, img_size=16, decoder_depth=1)
    assert model.config.encoder_kwargs == dict(
        patch_size=8, embed_dim=96, depth=3, num_heads=4, img_size=16
    )
    assert len(model.blocks) == 1
    assert model.head.weight is model.token_embed.weight  # tied
    with pytest.raises(TypeError, match="did you mean 'decoder_depth'"):
        create_model("caption_mini_patch8_32", decoder_dept=2)
    with pytest.raises(ValueError, match="vocab_size"):
        create_model("caption_mini_patch8_32", vocab_size=2)


def test_load_encoder_from_a_classification_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    enc = dict(depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=4)
    vit = create_model("vit_tiny_patch4_32", num_classes=10, **enc)
    path = tmp_path / "cls.pt"
    # The training engine's layout: {"model": state dict}, here as saved from a compiled model.
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in vit.state_dict().items()}}, path)
    model = create_model("caption_mini_patch8_32", vocab_size=20, **enc)
    model.load_encoder(path)
    for k, v in model.encoder.state_dict().items():
        torch.testing.assert_close(v, vit.state_dict()[k])
    other = create_model("vit_tiny_patch4_32", **{**enc, "depth": 1})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: blocks\.1"):
        model.load_encoder(other.state_dict())


def test_cross_attention_maps() -> None:
    model = tiny_captioner()
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(4, 40, (2, 5))
    maps = cross_attention_maps(model, images, tokens)
    assert maps.shape == (2, 5, 4, 4)
    assert ((maps.sum((-1, -2)) > 0) & (maps.sum((-1, -2)) <= 1 + 1e-6)).all()
    assert model.blocks[-1].cross_attn.recorder is None  # restored


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_save_load(tmp_path) -> None:
    captions = ["A dog runs, fast.", "a cat's toy", "two dogs"]
    tok = Tokenizer.build(captions)
    assert tok.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for c in captions:
        ids, unknown, cut = tok.encode(c)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and unknown == 0 and not cut
        assert tok.decode(ids) == " ".join(Tokenizer.split(c))
    assert tok.decode(tok.encode("A dog runs, fast.")[0]) == "a dog runs , fast ."
    tok.save(tmp_path / "vocab.json")
    assert Tokenizer.load(tmp_path / "vocab.json") == tok


def test_tokenizer_unknown_words_and_truncation() -> None:
    tok = Tokenizer.build(["a red circle"])
    ids, unknown, cut = tok.encode("a blue circle")
    assert unknown == 1 and tok.decode(ids) == "a <unk> circle" and not cut
    ids, _, cut = tok.encode("a red circle a red circle", max_len=5)
    assert cut and len(ids) == 5 and ids[-1] == tok.eos_id and tok.decode(ids) == "a red circle"


def test_tokenizer_bad_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="captions are empty"):
        Tokenizer.build(["", "  "])


def test_dataset_reports_truncation_and_unknown_words(caplog) -> None:
    tok = Tokenizer.build(["a red circle"])
    data = CaptionData(
        torch.zeros(2, 3, 16, 16, dtype=torch.uint8), [["a red circle"], ["a blue red circle"]]
    )
    with caplog.at_level(logging.WARNING, logger="vit.captions"):
        ds = CaptionDataset(data, tok, max_len=5, img_size=16, name="toy")
    assert ds.stats == {"images": 2, "captions": 2, "truncated": 1, "unknown_words": 1}
    assert "1 of 2 captions are longer than max_len=5" in caplog.text
    assert "1 words in 1 captions are not in the vocabulary and map to <unk>" in caplog.text
    image, tokens, index = ds[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and index == 1
    assert tokens.tolist() == [1, 4, 3, 5, 2]


def test_training_augmentation_flips_left_and_right_with_the_image() -> None:
    data = make_shapes(64, seed=0)
    tok = Tokenizer.build(c for caps in data.captions for c in caps)
    flip = CaptionDataset(data, tok, max_len=32, img_size=32, hflip=True, seed=0)
    crop = CaptionDataset(data, tok, max_len=32, img_size=32, crop_padding=2, seed=0)
    swap = {"left": "right", "right": "left"}
    flipped = 0
    for row in range(64):
        plain_img, plain_tokens, _ = flip[row]  # plain indices (validation): no augmentation
        assert torch.equal(plain_img, data.images[row])
        img, tokens, i = flip[(3, row)]  # (epoch, index) keys (training)
        assert i == row and torch.equal(img, flip[(3, row)][0])  # a function of (seed, epoch, row)
        words = tok.decode(plain_tokens).split()
        if torch.equal(img, plain_img.flip(-1)):
            flipped += 1
            assert tok.decode(tokens).split() == [swap.get(w, w) for w in words]
        else:
            assert torch.equal(img, plain_img) and torch.equal(tokens, plain_tokens)
        shifted, _, _ = crop[(3, row)]
        padded = nn.functional.pad(plain_img, (2, 2, 2, 2))
        assert any(
            torch.equal(shifted, padded[:, dy : dy + 32, dx : dx + 32])
            for dy in range(5)
            for dx in range(5)
        )
    assert 10 < flipped < 54


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------
def test_shapes_are_deterministic_and_captions_say_what_and_where() -> None:
    a, b = make_shapes(300, seed=5), make_shapes(300, seed=5)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.captions != make_shapes(300, seed=6).captions
    singles = 0
    for img, (caption,) in zip(a.images, a.captions, strict=True):
        if " in the " not in caption:
            continue
        singles += 1
        # The one shape's pixels lie in the named quadrant and have the named colour's hue.
        drawn = (img.int() - 12).abs().sum(0) > 30
        ys, xs = drawn.nonzero(as_tuple=True)
        top, left = ys.float().mean() < 16, xs.float().mean() < 16
        assert caption.endswith(("top" if top else "bottom") + " " + ("left" if left else "right"))
        rgb = img[:, ys, xs].float().mean(1)
        color = caption.split()[2]
        expected = {"red": 0, "green": 1, "blue": 2}.get(color)
        if expected is not None:
            assert rgb.argmax() == expected
    assert singles > 50
    relations = {
        c for (cap,) in a.captions for c in ("above", "below", "to the left of") if c in cap
    }
    assert relations == {"above", "below", "to the left of"}


def test_shapes_splits_are_held_out() -> None:
    train = load_caption_data("shapes", "train", num_scenes=200)
    val = load_caption_data("shapes", "val", num_scenes=200)
    assert not any(torch.equal(v, t) for v in val.images[:50] for t in train.images)


FLICKR_CSV = """image,caption
a.jpg,"A dog runs, fast ."
a.jpg,A brown dog on grass .
b.jpg,Two children play
"""
FLICKR_TOKEN = (
    "a.jpg#0\tA dog runs, fast .\na.jpg#1\tA brown dog on grass .\nb.jpg#0\tTwo children play\n"
)


def _write_images(folder, names) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (20, 24), (200, 10, 10)).save(folder / n)


@pytest.mark.parametrize("fmt", ["captions.txt", "Flickr8k.token.txt"])
def test_flickr8k_both_formats_parse(tmp_path, fmt: str) -> None:
    (tmp_path / fmt).write_text(FLICKR_CSV if fmt == "captions.txt" else FLICKR_TOKEN)
    parsed = read_flickr8k_captions(tmp_path / fmt)
    assert parsed == {
        "a.jpg": ["A dog runs, fast .", "A brown dog on grass ."],
        "b.jpg": ["Two children play"],
    }
    _write_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    data = load_flickr8k(tmp_path, "train")
    assert len(data) == 2 and data.captions[0] == parsed["a.jpg"]
    ds = CaptionDataset(data, Tokenizer.build(FLICKR_CSV.splitlines()), max_len=12, img_size=16)
    image, tokens, index = ds[1]  # the second caption of a.jpg
    assert len(ds) == 3 and image.shape == (3, 16, 16) and index == 0
    assert image[0].float().mean() > 150 and tokens[0] == Tokenizer([]).bos_id


def test_flickr8k_missing_images_are_counted_and_skipped(tmp_path, caplog) -> None:
    (tmp_path / "captions.txt").write_text(FLICKR_CSV)
    _write_images(tmp_path / "Images", ["a.jpg"])
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    with caplog.at_level(logging.WARNING, logger="vit.captions"):
        data = load_flickr8k(tmp_path, "train")
    assert [p.name for p in data.images] == ["a.jpg"]
    assert "1 of 2 images named in the captions file are missing" in caplog.text
    assert "b.jpg" in caplog.text


def test_flickr8k_bad_input(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no captions file"):
        load_flickr8k(tmp_path, "train")
    (tmp_path / "captions.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_flickr8k(tmp_path, "train")
    (tmp_path / "captions.txt").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(ValueError, match="expected a CSV header 'image,caption'"):
        read_flickr8k_captions(tmp_path / "captions.txt")
    (tmp_path / "captions.txt").write_text(FLICKR_CSV)
    with pytest.raises(FileNotFoundError, match="no images folder"):
        load_flickr8k(tmp_path, "train")
    _write_images(tmp_path / "Images", [])
    with pytest.raises(ValueError, match="none of the captioned images"):
        load_flickr8k(tmp_path, "val")
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_caption_data("flickr8k", "train")


def test_bleu_uses_every_reference() -> None:
    refs = [["a dog runs on the grass", "the brown dog is running"], ["two kids play in a park"]]
    assert bleu_scores(["The brown dog is running", "two kids play in a park"], refs)[
        "bleu4"
    ] == pytest.approx(1.0)
    partial = bleu_scores(["a dog runs on a road", "two kids play"], refs)
    assert 0 < partial["bleu4"] < partial["bleu1"] < 1
    with pytest.raises(ValueError, match="one per image"):
        bleu_scores(["a"], refs)


# ----------------------------------------------------------------------------------------------
# Through the training engine
# ----------------------------------------------------------------------------------------------
def _caption_flags(out_dir, **over) -> list[str]:
    values = {
        "task": "caption",
        "data": "shapes",
        "model": "caption_mini_patch8_32",
        "model_args": "{embed_dim: 32, depth: 1, num_heads: 2, decoder_depth: 1}",
        "task_args": "{train_scenes: 96, val_scenes: 16, max_len: 28, sample_images: 2}",
        "img_size": 16,
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.003,
        "log_every": 4,
        "amp": "bf16",
        "crop_padding": 1,
        "hflip": True,
        "out_dir": str(out_dir),
        **over,
    }
    flags = []
    for k, v in values.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return [f for f in flags if f != "True"]  # --hflip is a switch


def test_caption_training_through_the_engine_resumes_exactly(tmp_path, sigterm_at_step, capsys):
    import json
    import signal

    from vit.engine.captioning import CaptionTask
    from vit.evaluate import main as evaluate_main
    from vit.train import main as train_main

    assert train_main(_caption_flags(tmp_path / "a")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bleu1", "bleu4", "cider", "loss", "n"} <= set(result) and result["n"] == 16
    run = tmp_path / "a"
    assert {"best.pt", "last.pt", "vocab.json", "config.yaml", "metrics.jsonl"} <= {
        p.name for p in run.iterdir()
    }
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert Tokenizer.load(run / "vocab.json").itos == ckpt["task_state"]["vocab"]

    # TensorBoard: loss and BLEU scalars, sample captions as text, attention maps as images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/bleu4", "val/loss"} <= set(tags["scalars"])
    assert "captions/samples/text_summary" in tags["tensors"]
    assert {"captions/attention_0", "captions/attention_1"} <= set(tags["images"])

    # Killed mid-epoch (SIGTERM at step 8 of 12), resumed: the same weights as run a.
    disarm = sigterm_at_step(CaptionTask, 8)
    b = _caption_flags(tmp_path / "b")
    assert train_main(b) == 128 + signal.SIGTERM
    disarm()
    assert train_main([*b, "--resume", "auto"]) == 0
    wa = torch.load(run / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    capsys.readouterr()

    # vit.evaluate reports the same BLEU as the end of training, through the task interface.
    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--amp", "bf16"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["bleu4"] == pytest.approx(result["bleu4"])
    assert evaluated["n"] == 16


def test_caption_cli(tmp_path, capsys) -> None:
    from PIL import Image

    from vit.caption import main as caption_main
    from vit.train import main as train_main

    assert train_main(_caption_flags(tmp_path / "run", epochs=1, amp="off")) == 0
    scenes = make_shapes(2, img_size=16, seed=7)
    paths = []
    for i, img in enumerate(scenes.images):
        paths.append(str(tmp_path / f"scene{i}.png"))
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "best.pt")
    assert caption_main(["--checkpoint", ckpt, "--images", *paths, "--beam-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == paths
    # The convention of vit.predict: files and folders (recursively), a checkpoint or an export.
    from vit.export import main as export_main

    folder = tmp_path / "scenes"
    (folder / "more").mkdir(parents=True)
    for i, path in enumerate(paths):
        Path(path).replace(folder / ("more" if i else ".") / Path(path).name)
    assert export_main(["--checkpoint", ckpt, "--out-dir", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    assert (
        caption_main(["--checkpoint", str(tmp_path / "export"), str(folder), "--beam-size", "2"])
        == 0
    )
    from_folder = capsys.readouterr().out.strip().splitlines()
    # Both images, found recursively (sorted), each with the caption the checkpoint gave it.
    assert [line.split(": ")[0] for line in from_folder] == [
        str(folder / "more" / "scene1.png"),
        str(folder / "scene0.png"),
    ]
    by_name = {Path(line.split(": ")[0]).name: line.split(": ")[1] for line in lines}
    assert {Path(x.split(": ")[0]).name: x.split(": ")[1] for x in from_folder} == by_name
    assert caption_main(["--checkpoint", ckpt, "--images", str(tmp_path / "nope.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such file or folder") and err.count("\n") == 1


def test_caption_task_refuses_bad_config(tmp_path, capsys) -> None:
    from vit.train import main as train_main

    cases = [
        ({"task_args": "{max_lenn: 20}"}, "unknown task_args key 'max_lenn' for task 'caption'"),
        ({"mixup": 0.8}, "mixup are classification augmentations"),
        ({"model_args": "{vocab_size: 10}"}, "set vocab_size through the run config"),
        ({"data": "flickr8k", "data_dir": str(tmp_path)}, "no captions file in"),
    ]
    for over, message in cases:
        assert train_main(_caption_flags(tmp_path / "bad", **over)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_cider_d_matches_the_coco_evaluation_code() -> None:
    hyps = ["a red circle on the left", "two blue squares", "a cat"]
    refs = [
        ["a red circle to the left", "a red disk on the left"],
        ["two blue squares side by side"],
        ["a dog", "a small dog on grass"],
    ]
    # The value pycocoevalcap 1.2's CiderScorer (COCO's CIDEr-D) gives for this corpus.
    assert cider_d(hyps, refs) == pytest.approx(2.7544753847062284, rel=1e-12)
    # Every caption has a 4-gram (else its n = 4 term is 0, as in the reference code).
    distinct = [["a red circle on the left"], ["two blue squares in a row"], ["a cat on a mat"]]
    assert cider_d([r[0] for r in distinct], distinct) == pytest.approx(10.0)
    assert cider_d(["zebra", "zebra", "zebra"], distinct) == 0.0


def test_coco_captions_through_torchvision(tmp_path, caplog) -> None:
    import json

    pytest.importorskip("pycocotools", reason="--data coco needs pycocotools")
    ann = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "height": 24, "width": 20},
            {"id": 2, "file_name": "2.jpg", "height": 24, "width": 20},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A red square."},
            {"id": 11, "image_id": 1, "caption": "Something red"},
            {"id": 12, "image_id": 2, "caption": "A missing picture"},
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(ann))
    _write_images(tmp_path / "val2017", ["1.jpg"])
    with caplog.at_level(logging.WARNING, logger="vit.captions"):
        data = load_caption_data("coco", "val", data_dir=tmp_path)
    assert [p.name for p in data.images] == ["1.jpg"]
    assert data.captions == [["A red square.", "Something red"]]
    assert "1 of 2 images are missing" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"captions_train2017\.json"):
        load_caption_data("coco", "train", data_dir=tmp_path)
