"""Show, Attend and Tell: additive attention against its formula written out, the LSTM decoder's
teacher forcing against a step-by-step run of the same weights, generation, the doubly stochastic
penalty against its definition, gradients, the named variant, word → patch maps, and the LSTM
through the engine's caption task (its loss with the penalty, TensorBoard, evaluate, caption)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vit.captions import (
    CaptionDataset,
    Tokenizer,
    attention_strip,
    cross_attention_maps,
    make_shapes,
    normalize,
)
from vit.layers import AdditiveAttention, scaled_dot_product_attention
from vit.models import CaptioningLSTM, create_model, num_params
from vit.models.show_attend_tell import doubly_stochastic_penalty

ENC = dict(depth=2, embed_dim=32, num_heads=2, img_size=16, patch_size=4)  # 4x4 = 16 patches
DEC = dict(word_dim=24, hidden_dim=40, attn_dim=20)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The recurrence is many tiny ops: one thread spares them the cost of synchronising threads,
    most of all when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_lstm(vocab_size: int = 40, seed: int = 0, **kw) -> CaptioningLSTM:
    torch.manual_seed(seed)
    model = create_model(
        "caption_lstm_mini_patch8_32", vocab_size=vocab_size, **{**ENC, **DEC, **kw}
    )
    return model.eval()


# ----------------------------------------------------------------------------------------------
# AdditiveAttention == vᵀ tanh(W_q q + W_k k + b), written out with loops
# ----------------------------------------------------------------------------------------------
def _dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y, strict=True))


def _additive_by_loops(att: AdditiveAttention, q, k, v, keep) -> tuple[list, list]:
    """out[b][i], weights[b][i] in scalar arithmetic; ``keep[b][j]`` False hides key j."""
    w_q, w_k, w_v = att.to_q.weight.tolist(), att.to_k.weight.tolist(), att.to_score.weight[0]
    w_v = w_v.tolist()
    bias = att.to_k.bias.tolist() if att.to_k.bias is not None else [0.0] * len(w_v)
    q, k, v = q.tolist(), k.tolist(), v.tolist()
    outs, weights = [], []
    for b in range(len(q)):
        outs.append([])
        weights.append([])
        for q_i in q[b]:
            scores = []
            for k_j in k[b]:  # vᵀ tanh(W_q q + W_k k + b)
                hidden = [
                    math.tanh(_dot(w_q[a], q_i) + _dot(w_k[a], k_j) + bias[a])
                    for a in range(len(w_v))
                ]
                scores.append(_dot(w_v, hidden))
            top = max(s for s, kept in zip(scores, keep[b], strict=True) if kept)
            e = [
                math.exp(s - top) if kept else 0.0 for s, kept in zip(scores, keep[b], strict=True)
            ]
            w = [x / sum(e) for x in e]
            weights[b].append(w)
            outs[b].append([_dot(w, [v_j[d] for v_j in v[b]]) for d in range(len(v[b][0]))])
    return outs, weights


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_additive_attention_is_the_formula(masked: bool, bias: bool) -> None:
    torch.manual_seed(0)
    b, tq, tk, dq, dk, dv, a = 2, 3, 5, 4, 6, 3, 7
    att = AdditiveAttention(dq, dk, a, bias=bias).double()
    q, k, v = torch.randn(b, tq, dq), torch.randn(b, tk, dk), torch.randn(b, tk, dv)
    q, k, v = q.double(), k.double(), v.double()
    keep = torch.ones(b, tk, dtype=torch.bool)
    if masked:
        keep[0, 1] = keep[0, 4] = keep[1, 0] = False
    mask = keep[:, None, :] if masked else None  # (B, 1, Tk): broadcast over the queries
    out, weights = att(q, k, v, mask)
    exp_out, exp_w = _additive_by_loops(att, q, k, v, keep.tolist())
    torch.testing.assert_close(out, torch.tensor(exp_out, dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor(exp_w, dtype=torch.float64))
    assert (weights.masked_select(~keep[:, None, :].expand_as(weights)) == 0.0).all()  # exactly
    if masked:  # the mask means what it means for dot-product attention
        qs, ks = torch.randn(b, tq, 2), torch.randn(b, tk, 2)
        _, sdpa_w = scaled_dot_product_attention(qs, ks, torch.randn(b, tk, 1), mask)
        assert torch.equal(sdpa_w == 0, weights == 0)
        additive = torch.zeros(b, 1, tk, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        out_f, weights_f = att(q, k, v, additive)  # a float mask is added to the scores
        torch.testing.assert_close(out_f, out)
        torch.testing.assert_close(weights_f, weights)
    # One query per sample (a recurrent step), with the keys projected beforehand.
    out1, w1 = att(q[:, 1], k, v, keep if masked else None, projected_keys=att.project_keys(k))
    torch.testing.assert_close(out1, out[:, 1])
    torch.testing.assert_close(w1, weights[:, 1])


# ----------------------------------------------------------------------------------------------
# The LSTM decoder == its equations run step by step
# ----------------------------------------------------------------------------------------------
def _step_by_step(model: CaptioningLSTM, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Xu et al. (2015) Sec. 3.1.2, Eq. 1-7 and Sec. 4.2.1, one token at a time, from the
    model's weights (the LSTM cell, the linear maps), not from its forward."""
    att = model.attention
    act = torch.tanh if model.config.deep_output == "tanh" else (lambda x: x)
    a = model.encoder.forward_features(images)[:, 1:]  # annotations: the patch tokens
    mean = a.mean(dim=1)
    h, c = model.init_h(mean), model.init_c(mean)
    logits, alphas = [], []
    for t in range(tokens.shape[1]):
        e = model.token_embed(tokens[:, t])  # E y_{t-1}
        scores = att.to_score(torch.tanh(att.to_q(h)[:, None] + att.to_k(a)))[..., 0]  # (B, N)
        alpha = scores.softmax(dim=-1)
        beta = torch.sigmoid(model.gate(h))  # (B, 1)
        z = beta * (alpha[..., None] * a).sum(dim=1)
        h, c = model.cell(torch.cat([e, z], dim=-1), (h, c))
        logits.append(model.head(act(e + model.out_h(h) + model.out_z(z))))  # Eq. 7
        alphas.append(alpha)
    return torch.stack(logits, dim=1), torch.stack(alphas, dim=1)


def test_teacher_forcing_equals_the_step_by_step_equations() -> None:
    model = tiny_lstm().double()
    images, tokens = torch.randn(3, 3, 16, 16).double(), torch.randint(3, 40, (3, 7))
    logits, alphas = model(images, tokens, return_attention=True)
    assert logits.shape == (3, 7, 40) and alphas.shape == (3, 7, 16)
    expected_logits, expected_alphas = _step_by_step(model, images, tokens)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(alphas, expected_alphas)
    torch.testing.assert_close(model(images, tokens), logits)  # return_attention changes nothing
    linear = tiny_lstm(deep_output="linear").double()  # Eq. 7 as printed: no tanh
    out = linear(images, tokens)
    torch.testing.assert_close(out, _step_by_step(linear, images, tokens)[0])
    assert not torch.allclose(out, logits)


def test_padding_steps_leave_the_recurrent_state_alone() -> None:
    model = tiny_lstm().double()
    images, tokens = torch.randn(2, 3, 16, 16).double(), torch.randint(3, 40, (2, 6))
    # Right padding: the real steps are those of the unpadded captions.
    padded = torch.cat([tokens, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    got = model(images, padded, padding_mask=padded == 0)[:, :6]
    torch.testing.assert_close(got, model(images, tokens))
    # Left padding: the padding tokens cannot reach the later steps.
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[:, :2] = True
    changed = tokens.clone()
    changed[:, :2] = (tokens[:, :2] + 5) % 37 + 3
    a = model(images, tokens, padding_mask=pad)[:, 2:]
    torch.testing.assert_close(a, model(images, changed, padding_mask=pad)[:, 2:])
    assert not torch.allclose(model(images, tokens)[:, 2:], model(images, changed)[:, 2:])


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes16() -> tuple[CaptionDataset, Tokenizer]:
    data = make_shapes(512, img_size=16, seed=0)
    tok = Tokenizer.build(c for caps in data.captions for c in caps)
    return CaptionDataset(data, tok, max_len=32, img_size=16), tok


@pytest.fixture(scope="module")
def trained_model(shapes16) -> CaptioningLSTM:
    """Trained for a few seconds, so that captions vary and end at different steps; float64, so
    that the two generation paths cannot flip an argmax by rounding."""
    ds, tok = shapes16
    model = tiny_lstm(vocab_size=len(tok), decoder_drop_rate=0.0).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    images, tokens = normalize(ds.data.images), ds.tokens
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(ds), (32,), generator=g)
        inputs, targets = tokens[idx, :-1], tokens[idx, 1:]
        length = int((targets != tok.pad_id).sum(1).max())
        logits = model(images[idx], inputs[:, :length])
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[:, :length].flatten(), ignore_index=tok.pad_id
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().double()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return normalize(make_shapes(8, img_size=16, seed=99).images).double()


def test_generation_with_the_recurrent_state_equals_rerunning_the_prefix(
    trained_model, images
) -> None:
    cfg = trained_model.config
    greedy = trained_model.generate(images, 20)
    assert torch.equal(greedy, trained_model.generate(images, 20, use_cache=False))
    assert len(set(greedy.flatten().tolist())) > 6  # real captions, not one repeated token
    ends = greedy == cfg.eos_id
    assert ends.any(1).all() and len(set(ends.int().argmax(1).tolist())) > 1  # varied lengths
    for k in (2, 3):
        beam = trained_model.generate(images, 20, beam_size=k)
        assert torch.equal(beam, trained_model.generate(images, 20, beam_size=k, use_cache=False))


def test_beam_size_one_is_greedy(trained_model, images) -> None:
    greedy = trained_model.generate(images, 20)
    memory = trained_model.forward_memory(images)
    with torch.no_grad():
        for use_cache in (True, False):  # generate() sends beam_size 1 to greedy decoding
            assert torch.equal(trained_model._beam_search(memory, 20, 1, use_cache), greedy)


def test_generated_captions_stop_at_eos_and_pad_after_it(trained_model, images) -> None:
    cfg = trained_model.config
    for beam_size in (1, 3):
        for row in trained_model.generate(images, 20, beam_size=beam_size).tolist():
            assert cfg.bos_id not in row and cfg.eos_id in row
            assert all(t == cfg.pad_id for t in row[row.index(cfg.eos_id) + 1 :])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_output_bias_forces_eos_or_runs_to_max_len(beam_size: int) -> None:
    model = tiny_lstm()
    images = torch.randn(3, 3, 16, 16)
    cfg = model.config
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[cfg.eos_id] = 100.0  # <eos> first: every caption ends at once
    ids = model.generate(images, 9, beam_size)
    # Greedy stops after one token; beam search after two, once the other hypotheses have ended
    # (at a far lower score) while the best one took <pad>.
    assert ids.shape == (3, 1 if beam_size == 1 else 2)
    assert (ids[:, 0] == cfg.eos_id).all() and (ids[:, 1:] == cfg.pad_id).all()
    with torch.no_grad():
        model.head.bias[cfg.eos_id] = -100.0
        model.head.bias[7] = 100.0  # never <eos>: every caption runs to max_len
    assert torch.equal(model.generate(images, 9, beam_size), torch.full((3, 9), 7))


def test_bad_arguments_are_refused() -> None:
    model = tiny_lstm()
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="max_len must be an integer in \\[1, 31\\]"):
        model.generate(images, 32)
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(images, 5, beam_size=0)
    with pytest.raises(TypeError, match="int64"):
        model(images, torch.ones(1, 5))
    with pytest.raises(TypeError, match="padding_mask must be a bool"):
        model(images, torch.ones(1, 5, dtype=torch.long), padding_mask=torch.zeros(1, 5))
    with pytest.raises(TypeError, match="did you mean 'hidden_dim'"):
        create_model("caption_lstm_mini_patch8_32", hiden_dim=8)
    with pytest.raises(ValueError, match="deep_output"):
        create_model("caption_lstm_mini_patch8_32", deep_output="relu")


# ----------------------------------------------------------------------------------------------
# Doubly stochastic attention, gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_mask", [False, True])
def test_doubly_stochastic_penalty_is_its_definition(with_mask: bool) -> None:
    torch.manual_seed(0)
    b, t, n, lam = 3, 5, 4, 0.7
    alphas = torch.randn(b, t, n, dtype=torch.float64).softmax(-1)
    mask = torch.zeros(b, t, dtype=torch.bool)
    if with_mask:
        mask[0, 3:] = mask[2, 1:] = True
    total = 0.0
    for i in range(b):
        for loc in range(n):
            attended = sum(float(alphas[i, s, loc]) for s in range(t) if not mask[i, s])
            total += lam * (1.0 - attended) ** 2
    got = doubly_stochastic_penalty(alphas, mask if with_mask else None, lam=lam)
    assert got.shape == () and math.isclose(float(got), total / b, rel_tol=1e-12)


def test_every_parameter_gets_a_gradient() -> None:
    model = tiny_lstm().train()  # dropout on, as in training
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(3, 40, (2, 6))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    logits, alphas = model(images, tokens, padding_mask=pad, return_attention=True)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    (loss + doubly_stochastic_penalty(alphas, pad)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------
# The named variant
# ----------------------------------------------------------------------------------------------
def test_variant_mirrors_the_mini_encoder_and_counts_its_parameters() -> None:
    v = 40
    model = create_model("caption_lstm_mini_patch8_32", vocab_size=v)
    transformer = create_model("caption_mini_patch8_32", vocab_size=v)
    assert model.config.encoder == transformer.config.encoder
    assert model.config.encoder_kwargs == transformer.config.encoder_kwargs
    assert model.encoder.config == transformer.encoder.config
    d, m, n, a = 96, 96, 192, 96  # encoder width, word width, LSTM width, attention width
    assert (model.config.word_dim, model.config.hidden_dim, model.config.attn_dim) == (m, n, None)
    decoder = (
        v * m  # E
        + 2 * (d * d + d + d * n + n)  # f_init,h and f_init,c
        + n * a
        + d * a
        + a
        + a  # f_att: W_q, W_k and b, v
        + n
        + 1  # f_β
        + 4 * n * (m + d)
        + 4 * n * n
        + 2 * 4 * n  # LSTM (two bias vectors, as nn.LSTMCell)
        + n * m
        + m
        + d * m
        + m * v
        + v  # L_h, L_z, L_o
    )
    assert num_params(model) == num_params(transformer.encoder) + decoder == 771_785
    assert model.no_weight_decay() == {"encoder.pos_embed", "encoder.cls_token"}


def test_load_encoder_from_a_classification_checkpoint() -> None:
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch4_32", num_classes=10, **ENC)
    model = tiny_lstm()
    model.load_encoder(vit.state_dict())
    for k, value in model.encoder.state_dict().items():
        torch.testing.assert_close(value, vit.state_dict()[k])


# ----------------------------------------------------------------------------------------------
# Word → patch maps: α on the patch grid, through the caption task's one function
# ----------------------------------------------------------------------------------------------
def test_word_attention_is_alpha_on_the_patch_grid() -> None:
    model = tiny_lstm()
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(3, 40, (2, 5))
    maps = cross_attention_maps(model, images, tokens)
    _, alphas = model(images, tokens, return_attention=True)
    assert maps.shape == (2, 5, 4, 4)
    torch.testing.assert_close(maps.flatten(2), alphas)  # row-major, as the patch tokens
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 5))  # patches only: rows sum to 1
    with pytest.raises(TypeError, match="layer"):  # an LSTM has no decoder blocks to choose from
        cross_attention_maps(model, images, tokens, layer=0)


def test_attention_strip_draws_the_lstm_maps(shapes16) -> None:
    ds, tok = shapes16
    model = tiny_lstm(vocab_size=len(tok))
    image = ds.data.images[:1]
    caption = ds.references[0][0]
    strip = attention_strip(model, normalize(image), image[0].float() / 255, caption, tok)
    words = len(Tokenizer.split(caption))
    # The image and one panel per word, each 16 px scaled to 96 px plus a 2 px gap; a label row.
    assert strip.dtype == torch.uint8 and strip.shape == (3, 96 + 16, (words + 1) * 98)


# ----------------------------------------------------------------------------------------------
# Through the training engine and the caption task
# ----------------------------------------------------------------------------------------------
def _lstm_flags(out_dir, **over) -> list[str]:
    values = {
        "task": "caption",
        "data": "shapes",
        "model": "caption_lstm_mini_patch8_32",
        "model_args": "{embed_dim: 32, depth: 1, num_heads: 2, word_dim: 24, hidden_dim: 48}",
        "task_args": "{train_scenes: 96, val_scenes: 16, max_len: 28, sample_images: 2}",
        "img_size": 16,
        "epochs": 2,
        "batch_size": 16,
        "lr": 0.003,
        "log_every": 4,
        "amp": "bf16",
        "out_dir": str(out_dir),
        **over,
    }
    flags = []
    for k, v in values.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def _task(vocab: list[str], **task_args):
    from vit.engine.captioning import CaptionTask
    from vit.engine.config import make_config

    values = {"task": "caption", "data": "shapes", "label_smoothing": 0.0, "task_args": task_args}
    cfg = make_config(values)
    return CaptionTask(cfg, {"vocab": vocab})


def test_task_loss_adds_the_penalty_per_token(shapes16) -> None:
    ds, tok = shapes16
    model = tiny_lstm(vocab_size=len(tok), decoder_drop_rate=0.0)
    x, tokens = normalize(ds.data.images[:6]), ds.tokens[:6, :20]
    batch = (x, tokens, torch.arange(6))
    off, lam = _task(tok.itos, attention_penalty=0), _task(tok.itos, attention_penalty=0.5)
    assert _task(tok.itos).args["attention_penalty"] == 1.0  # the paper's λ by default
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, alphas = model(x, inputs, return_attention=True)
    pad = targets == tok.pad_id
    nll = nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=tok.pad_id
    )
    # Eq. 14 per token: the captions' summed NLL plus λ·Σ_i(1 − Σ_t α_ti)² per caption, over the
    # batch's tokens, with the steps that predict padding out of Σ_t.
    per_caption = sum((1 - alphas[i][~pad[i]].sum(0)).pow(2).sum() for i in range(len(tokens)))
    expected = nll + 0.5 * per_caption / (~pad).sum()
    torch.testing.assert_close(off.loss(model, batch, 0), nll)
    torch.testing.assert_close(lam.loss(model, batch, 0), expected)
    transformer = create_model("caption_mini_patch8_32", vocab_size=len(tok), img_size=16)
    assert torch.equal(  # the default λ does not apply to a decoder without α
        _task(tok.itos).loss(transformer, batch, 0), off.loss(transformer, batch, 0)
    )


def test_lstm_trains_through_the_engine_and_its_commands(tmp_path, capsys) -> None:
    import json

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vit.caption import main as caption_main
    from vit.evaluate import main as evaluate_main
    from vit.train import main as train_main

    run = tmp_path / "run"
    assert (
        train_main(
            _lstm_flags(
                run,
                task_args="{train_scenes: 96, val_scenes: 16, "
                "sample_images: 2, attention_penalty: 2}",
            )
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bleu4", "cider", "loss"} <= set(result) and result["n"] == 16
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["model_spec"]["name"] == "caption_lstm_mini_patch8_32"

    events = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"captions/attention_0", "captions/attention_1"} <= set(events.Tags()["images"])

    assert evaluate_main(["--checkpoint", str(run / "last.pt"), "--amp", "bf16"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["bleu4"] == pytest.approx(result["bleu4"]) and evaluated["n"] == 16

    path = tmp_path / "scene.png"
    Image.fromarray(make_shapes(1, img_size=16, seed=7).images[0].permute(1, 2, 0).numpy()).save(
        path
    )
    assert caption_main(["--checkpoint", str(run / "best.pt"), "--images", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: ")


def test_attention_penalty_is_refused_where_it_cannot_apply(tmp_path, capsys) -> None:
    from vit.train import main as train_main

    cases = [
        (
            {
                "model": "caption_mini_patch8_32",
                "model_args": "{embed_dim: 32, depth: 1}",
                "task_args": "{train_scenes: 96, val_scenes: 16, attention_penalty: 1}",
            },
            "'caption_mini_patch8_32' (CaptioningTransformer) has none: drop it or set it to 0",
        ),
        (
            {"task_args": "{attention_penalty: -0.5}"},
            "task_args.attention_penalty must be finite and >= 0, got -0.5",
        ),
        (
            {"task_args": "{attention_penalty: yes}"},
            "task_args.attention_penalty must be float, got True",
        ),
    ]
    for over, message in cases:
        assert train_main(_lstm_flags(tmp_path / "bad", **over)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
