"""What every captioner shares: caption search over a step function, and the :class:`Captioner`
base class (the encoder, generation's entry points, config checks).

A captioner supplies ``step(seq, state) -> (log_probs, state)``: the tokens so far (N, t), ``<bos>``
first, and its decoding state (a Transformer's key/value caches, an LSTM's ``(h, c)``) in; the
next token's log-probabilities (N, V) and the updated state out. The bookkeeping (finished
captions, ``<pad>`` after ``<eos>``, ranking and reordering hypotheses) lives here once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from einops import rearrange
from torch import Tensor, nn

from vit.errors import ConfigError
from vit.models._builder import load_pretrained
from vit.models._registry import check_options, create_model, register_config_variant
from vit.models.vision_transformer import VisionTransformer, ViTConfig

__all__ = [
    "DEFAULT_LENGTH_PENALTY",
    "Captioner",
    "TokenConfig",
    "beam_search",
    "check_caption_config",
    "check_generation_args",
    "greedy_search",
]

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]
ReorderFn = Callable[[Any, Tensor], Any]
# Beam search ranks by summed log-probability / length ** this (1: the mean per token).
DEFAULT_LENGTH_PENALTY = 1.0
MaxLen = int | None  # generate's max_len; None: as many tokens as the model's max_len allows


class TokenConfig(Protocol):
    """What search needs from a captioner's config (CaptionConfig, LSTMCaptionConfig)."""

    vocab_size: int
    max_len: int
    pad_id: int
    bos_id: int
    eos_id: int


def check_caption_config(
    cfg: Any,
    *,
    positive: Sequence[str],
    optional: Sequence[str] = (),
    rates: Sequence[str] = (),
    problems: Sequence[str] = (),
) -> None:
    """Raise one ``ValueError`` listing everything wrong with a captioner's config dataclass:
    ``positive`` fields that are not positive integers, ``optional`` ones that are neither that nor
    None, ``rates`` outside [0, 1), the caller's own ``problems``, special token ids (``pad_id``,
    ``bos_id``, ``eos_id``) that ``vocab_size`` does not cover."""
    found = []
    for name in positive:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) <= 0:
            found.append(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    for name in optional:
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            found.append(f"{name} must be a positive integer or None, got {value!r}")
    for name in rates:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            found.append(f"{name} must be in [0, 1), got {getattr(cfg, name)!r}")
    found += problems
    if max(cfg.pad_id, cfg.bos_id, cfg.eos_id) >= cfg.vocab_size:
        found.append(
            f"vocab_size {cfg.vocab_size} does not cover the special ids (pad {cfg.pad_id}, "
            f"bos {cfg.bos_id}, eos {cfg.eos_id}); pass vocab_size=len(tokenizer)"
        )
    if found:
        raise ValueError(f"invalid {type(cfg).__name__}: " + "; ".join(found))


def check_generation_args(
    max_len: int | None, beam_size: int, config: TokenConfig, length_penalty: float = 0.0
) -> int:
    """Validate ``generate``'s arguments; returns ``max_len`` (default ``config.max_len - 1``).

    Raises:
        ConfigError: (a ``ValueError``) an argument out of range, naming the range.
    """
    limit = config.max_len - 1
    max_len = limit if max_len is None else max_len
    if not isinstance(max_len, int) or not 1 <= max_len <= limit:
        raise ConfigError(
            f"max_len must be an integer in [1, {limit}] (the model's max_len minus <bos>), "
            f"got {max_len!r}"
        )
    if not isinstance(beam_size, int) or not 1 <= beam_size <= config.vocab_size:
        raise ConfigError(
            f"beam_size must be an integer in [1, vocab_size={config.vocab_size}], "
            f"got {beam_size!r}"
        )
    if not (isinstance(length_penalty, int | float) and 0 <= length_penalty <= 10):
        raise ConfigError(f"length_penalty must be a number in [0, 10], got {length_penalty!r}")
    return max_len


def greedy_search(
    step: StepFn,
    state: Any,
    config: TokenConfig,
    *,
    device: torch.device,
    batch_size: int,
    max_len: int,
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
    length_penalty: float = DEFAULT_LENGTH_PENALTY,
) -> Tensor:
    """Beam search; the best caption of each image, in :func:`greedy_search`'s format.

    Hypotheses are ranked by their summed log-probability divided by ``length ** length_penalty``
    (tokens generated, ``<eos>`` included): 0 ranks by the sum, which favours short captions (a
    weak model's beam then ends at once, with an empty caption); 1 (the default, as Hugging Face
    ``generate``'s) by the mean log-probability per token. Finished hypotheses keep their length;
    live ones are compared at the same length, so the penalty only weighs finished against live
    hypotheses (GNMT, Wu et al. 2016, applies it to finished ones likewise).

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
    lengths = torch.zeros(b * k, device=dev)  # tokens generated per hypothesis, <eos> included
    for _ in range(max_len):
        logp, state = step(seq, state)  # (B·K, V)
        logp = torch.where(done[:, None], pad_row, logp)
        cand = rearrange(scores, "b k -> (b k) 1") + logp  # summed log-probabilities
        cand_len = (lengths + (~done).float())[:, None]  # (B·K, 1)
        ranked = cand / cand_len.pow(length_penalty) if length_penalty else cand
        _, idx = rearrange(ranked, "(b k) v -> b (k v)", k=k).topk(k, dim=1)  # (B, K)
        scores = rearrange(cand, "(b k) v -> b (k v)", k=k).gather(1, idx)
        beam, tok = idx // config.vocab_size, idx % config.vocab_size
        src = (torch.arange(b, device=dev)[:, None] * k + beam).flatten()  # (B·K,)
        tok = tok.flatten()
        seq = torch.cat([seq[src], tok[:, None]], dim=1)
        lengths = lengths[src] + (~done[src]).float()
        done = done[src] | (tok == config.eos_id)
        state = reorder(state, src)
        if bool(done.all()):
            break
    # topk returns the hypotheses best first: beam 0 of each image is its best caption.
    return rearrange(seq, "(b k) t -> b k t", k=k)[:, 0, 1:]


class Captioner(nn.Module):
    """Base of the captioners: a ViT encoder named by the config, and what does not depend on the
    decoder (generation's entry points and search, the encoder's checkpoint and weight decay).

    A subclass sets ``config_class`` (a dataclass with :class:`TokenConfig`'s fields, ``encoder``
    and ``encoder_kwargs``), calls ``super().__init__(config, **overrides)`` before building its
    decoder (``self.config`` and ``self.encoder`` are set then), and supplies
    ``_stepper(memory, use_cache) -> (step, state)``, the search's step function and initial state
    for encoder memory, and ``_reorder(state, src)``, the state of the hypotheses ``src`` picks
    (beam search; see :func:`beam_search`).
    """

    config_class: ClassVar[type]

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__()
        self.config = _caption_config(config or self.config_class(), overrides)
        self.encoder = _caption_encoder(self.config)

    @classmethod
    def register_variants(cls, variants: dict[str, dict[str, Any]]) -> None:
        """Register each ``name: config defaults`` as a :func:`create_model` variant; keyword
        overrides apply as to the constructor."""
        for name, defaults in variants.items():
            register_config_variant(name, lambda d, o: cls(cls.config_class(**d), **o), defaults)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def load_encoder(self, source: str | os.PathLike[str] | dict[str, Tensor]) -> None:
        """Initialise the encoder from a classification checkpoint: a path, a state dict or a
        training checkpoint holding one under ``"model"``, ours or timm's.

        :func:`vit.models.load_pretrained` does the loading (key names, position-embedding
        resampling, the classifier head dropped); anything else that does not fit is a
        ``ValueError`` naming the keys.
        """
        load_pretrained(self.encoder, source)

    def forward_memory(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) → encoder memory (B, prefix+N, D_enc)."""
        return self.encoder.forward_features(images)

    def _on_grid(self, weights: Tensor) -> Tensor:
        """Word → patch weights (B, T, N) on the encoder's patch grid (B, T, gh, gw)."""
        gh, gw = self.encoder.grid_size
        return rearrange(weights, "b t (gh gw) -> b t gh gw", gh=gh, gw=gw)

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        max_len: MaxLen = None,
        beam_size: int = 1,
        *,
        use_cache: bool = True,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
    ) -> Tensor:
        """Caption images: token ids (B, L) after ``<bos>``, ``<eos>`` included, ``<pad>`` after it.

        ``max_len``: the most tokens to generate (default: as many as the model's ``max_len``
        allows, ``config.max_len - 1``). ``beam_size`` 1 is greedy decoding; larger runs beam search
        ranking hypotheses by their summed log-probability over ``length ** length_penalty``
        (default 1: the mean log-probability per token; 0: the sum, see :func:`beam_search`).
        With ``use_cache``
        each step feeds only the newest token and carries the decoding state (a Transformer's
        key/value caches, an LSTM's (h, c)) to the next; without it every step re-runs the decoder
        over the whole prefix (the reference for tests and the speed benchmark).
        """
        max_len = check_generation_args(max_len, beam_size, self.config, length_penalty)
        memory = self.forward_memory(images)
        return self.generate_from_memory(
            memory, max_len, beam_size, use_cache=use_cache, length_penalty=length_penalty
        )

    @torch.no_grad()
    def generate_from_memory(
        self,
        memory: Tensor,
        max_len: MaxLen = None,
        beam_size: int = 1,
        *,
        use_cache: bool = True,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
    ) -> Tensor:
        """:meth:`generate` for encoder memory (B, S, D_enc) computed by :meth:`forward_memory`."""
        max_len = check_generation_args(max_len, beam_size, self.config, length_penalty)
        if beam_size == 1:
            return self._greedy(memory, max_len, use_cache)
        return self._beam_search(memory, max_len, beam_size, use_cache, length_penalty)

    def _stepper(self, memory: Tensor, use_cache: bool) -> tuple[StepFn, Any]:
        raise NotImplementedError

    @staticmethod
    def _reorder(state: Any, src: Tensor) -> Any:
        raise NotImplementedError

    def _greedy(self, memory: Tensor, max_len: int, use_cache: bool) -> Tensor:
        step, state = self._stepper(memory, use_cache)
        b, dev = memory.shape[0], memory.device
        return greedy_search(step, state, self.config, batch_size=b, max_len=max_len, device=dev)

    def _beam_search(
        self,
        memory: Tensor,
        max_len: int,
        k: int,
        use_cache: bool,
        length_penalty: float = DEFAULT_LENGTH_PENALTY,
    ) -> Tensor:
        b = memory.shape[0]
        memory = memory.repeat_interleave(k, dim=0)  # (B·K, S, D): beam j of image i at i·K + j
        step, state = self._stepper(memory, use_cache)
        return beam_search(
            step,
            state,
            self._reorder,
            self.config,
            batch_size=b,
            beam_size=k,
            max_len=max_len,
            device=memory.device,
            length_penalty=length_penalty,
        )


def _caption_config(base: Any, overrides: dict[str, Any]) -> Any:
    """A captioner's config: ``base`` (a dataclass with ``encoder_kwargs``: CaptionConfig,
    LSTMCaptionConfig) with keyword ``overrides`` applied. Fields of ``base`` replace its own,
    ViTConfig fields go to the encoder's keyword arguments; anything else is a TypeError naming
    the closest options."""
    check_options(overrides, type(base), ViTConfig, what="captioning model")
    own = {f.name for f in dataclasses.fields(base)}
    caption_overrides = {k: v for k, v in overrides.items() if k in own}
    encoder_overrides = {k: v for k, v in overrides.items() if k not in own}
    if "num_classes" in encoder_overrides:
        raise ValueError("a captioner's encoder has no classifier head: drop num_classes")
    encoder_kwargs = {
        **base.encoder_kwargs,
        **caption_overrides.pop("encoder_kwargs", {}),
        **encoder_overrides,
    }
    return dataclasses.replace(base, **caption_overrides, encoder_kwargs=encoder_kwargs)


def _caption_encoder(cfg: Any) -> VisionTransformer:
    """The ViT named by a captioner's config (``encoder``, ``encoder_kwargs``), without a
    classifier head."""
    encoder = create_model(cfg.encoder, **{**cfg.encoder_kwargs, "num_classes": 0})
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"encoder {cfg.encoder!r} is not a VisionTransformer variant")
    return encoder
