"""Caption search shared by every captioner: greedy decoding and beam search over a step function.

A captioner supplies ``step(seq, state) -> (log_probs, state)``: the tokens so far (N, t), ``<bos>``
first, and its decoding state (a Transformer's key/value caches, an LSTM's ``(h, c)``) in; the
next token's log-probabilities (N, V) and the updated state out. The bookkeeping (finished
captions, ``<pad>`` after ``<eos>``, ranking and reordering hypotheses) lives here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["TokenConfig", "beam_search", "check_generation_args", "greedy_search"]

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]
ReorderFn = Callable[[Any, Tensor], Any]


class TokenConfig(Protocol):
    """What search needs from a captioner's config (CaptionConfig, LSTMCaptionConfig)."""

    vocab_size: int
    max_len: int
    pad_id: int
    bos_id: int
    eos_id: int


def check_generation_args(max_len: int | None, beam_size: int, config: TokenConfig) -> int:
    """Validate ``generate``'s arguments; returns ``max_len`` (default ``config.max_len - 1``)."""
    limit = config.max_len - 1
    max_len = limit if max_len is None else max_len
    if not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise ValueError(
            f"max_len must be an integer in [1, {limit}] (the model's max_len minus <bos>), "
            f"got {max_len!r}"
        )
    if not isinstance(beam_size, int) or not 1 <= beam_size <= config.vocab_size:
        raise ValueError(
            f"beam_size must be an integer in [1, vocab_size={config.vocab_size}], "
            f"got {beam_size!r}"
        )
    return max_len


def greedy_search(
    step: StepFn,
    state: Any,
    config: TokenConfig,
    *,
    batch_size: int,
    max_len: int,
    device: torch.device,
) -> Tensor:
    """Most likely token at each step: token ids (B, L ≤ max_len) after ``<bos>``, ``<eos>``
    included, ``<pad>`` after it; stops early once every caption has ended."""
    seq = torch.full((batch_size, 1), config.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logp, state = step(seq, state)
        nxt = logp.argmax(dim=-1).masked_fill(done, config.pad_id)  # (B,)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done |= nxt == config.eos_id
        if bool(done.all()):
            break
    return seq[:, 1:]


def beam_search(
    step: StepFn,
    state: Any,
    reorder: ReorderFn,
    config: TokenConfig,
    *,
    batch_size: int,
    beam_size: int,
    max_len: int,
    device: torch.device,
) -> Tensor:
    """Beam search ranking hypotheses by their summed log-probability (no length penalty); the
    best caption of each image, in :func:`greedy_search`'s format.

    ``state`` holds B·K rows, beam j of image i at row i·K + j (repeat the per-image state with
    ``repeat_interleave(K, dim=0)``). ``reorder(state, src)`` returns the state whose row r is row
    ``src[r]`` of the given one; ``src`` never leaves an image's block of K rows, so state that is
    the same for every beam of an image (encoder memory) need not move.
    """
    b, k, dev = batch_size, beam_size, device
    seq = torch.full((b * k, 1), config.bos_id, dtype=torch.long, device=dev)
    # Only the first beam is live at the start, so the K initial hypotheses are distinct.
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    # A finished hypothesis can only be extended by <pad>, at no cost, so it keeps competing
    # with its unchanged score.
    pad_row = torch.full((config.vocab_size,), float("-inf"), device=dev)
    pad_row[config.pad_id] = 0.0
    for _ in range(max_len):
        logp, state = step(seq, state)  # (B·K, V)
        logp = torch.where(done[:, None], pad_row, logp)
        cand = rearrange(scores, "b k -> (b k) 1") + logp
        scores, idx = rearrange(cand, "(b k) v -> b (k v)", k=k).topk(k, dim=1)  # (B, K)
        beam, tok = idx // config.vocab_size, idx % config.vocab_size
        src = (torch.arange(b, device=dev)[:, None] * k + beam).flatten()  # (B·K,)
        tok = tok.flatten()
        seq = torch.cat([seq[src], tok[:, None]], dim=1)
        done = done[src] | (tok == config.eos_id)
        state = reorder(state, src)
        if bool(done.all()):
            break
    # topk returns the hypotheses best first: beam 0 of each image is its best caption.
    return rearrange(seq, "(b k) t -> b k t", k=k)[:, 0, 1:]
