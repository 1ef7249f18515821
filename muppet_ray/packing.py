"""Packed micro-batches: the backbone's encoder runs on a micro-batch's real tokens only.

The micro-batch arrives padded ([rows, longest row], as Ray Data stored it). With
`model.attention: packed` the encoder sees its rows end to end as one stream of real tokens,
each token with its position in its own row, and attention stays inside each row: on a GPU the
stream is viewed as a jagged tensor (PyTorch's nested tensors), on which scaled-dot-product
attention runs FlashAttention's variable-length kernel; on a CPU attention alone pads the rows
again (measured faster there). The hidden states are then put back in the padded layout, so the
heads and losses read exactly what they read unpacked; what padding cost the linear layers (and on
GPUs attention) is gone.

The attention function is registered with transformers under `ATTENTION`; it falls back to
PyTorch SDPA with the usual masks for any call without the stream's row boundaries (BART's
decoder, and `generate`), so only the encoder's passes change.
"""

from __future__ import annotations

import contextvars
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "muppet_packed"
# Row positions of the stream being encoded, for BART's encoder, which takes no position ids.
_STREAM_POSITIONS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "stream_positions", default=None)


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """query, key, value: [1, heads, tokens, head size] for a stream whose rows start at
    `cu_seq_lens_q`; returns [1, tokens, heads, head size], as transformers' SDPA does."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    attend = jagged_attention if query.is_cuda else repadded_attention
    return attend(query, key, value, cu_seq_lens_q, max_length_q, dropout, scaling), None


def jagged_attention(query, key, value, starts, longest, dropout, scaling) -> torch.Tensor:
    """The rows as a jagged tensor: PyTorch runs FlashAttention's variable-length kernel on it
    (on GPUs; on CPUs it loops over the rows, slower than `repadded_attention`)."""
    def rows(x: torch.Tensor) -> torch.Tensor:  # [rows, heads, jagged length, head size]
        return torch.nested.nested_tensor_from_jagged(
            x[0].transpose(0, 1), starts, max_seqlen=longest).transpose(1, 2)

    out = F.scaled_dot_product_attention(rows(query), rows(key), rows(value), dropout_p=dropout,
                                         scale=scaling)
    return out.transpose(1, 2).values().unsqueeze(0)


def repadded_attention(query, key, value, starts, longest, dropout, scaling) -> torch.Tensor:
    """Attention alone on the rows padded again (the linear layers around it, most of the
    work, still see real tokens only)."""
    lengths = starts.diff()
    real = torch.arange(longest, device=query.device)[None] < lengths[:, None]

    def rows(x: torch.Tensor) -> torch.Tensor:  # [rows, heads, longest, head size]
        padded = x.new_zeros(len(lengths), longest, x.shape[1], x.shape[3])
        return padded.index_put((real,), x[0].transpose(0, 1)).transpose(1, 2)

    out = F.scaled_dot_product_attention(rows(query), rows(key), rows(value),
                                         attn_mask=real[:, None, None, :], dropout_p=dropout,
                                         scale=scaling)
    return out.transpose(1, 2)[real].unsqueeze(0)


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # (the unpacked calls' masks)


def use_packed_attention(backbone: nn.Module) -> None:
    # (BART does not declare `_supports_attention_backend`; its attention layers read the
    # implementation from the config all the same.)
    backbone.config._attn_implementation = ATTENTION
    if backbone.config.is_encoder_decoder:  # BART's encoder takes no position ids
        embed_positions = backbone.get_encoder().embed_positions
        embed_positions.forward = functools.partial(
            _stream_positions, embed_positions, type(embed_positions).forward)


def is_packed(backbone: nn.Module) -> bool:
    return backbone.config._attn_implementation == ATTENTION


class Stream(NamedTuple):
    """A padded micro-batch's real tokens, end to end."""

    tokens: torch.Tensor  # [rows, longest] bool: which padded cells are real
    kwargs: dict  # what the encoder takes for the stream


def pack(inputs: dict[str, torch.Tensor], position_offset: int) -> Stream:
    """`inputs`: input_ids, attention_mask (and token_type_ids), padded [rows, longest], each
    row's real tokens first. `position_offset`: where the backbone's positions start."""
    tokens = inputs["attention_mask"].bool()
    lengths = tokens.sum(dim=1)
    starts = F.pad(lengths.cumsum(0), (1, 0))
    positions = tokens.cumsum(dim=1)[tokens] - 1
    longest = int(lengths.max())
    kwargs = {
        "input_ids": inputs["input_ids"][tokens][None],
        "position_ids": (positions + position_offset)[None],
        # A prepared 4-D mask is passed on as it is: none is built for the whole stream.
        "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=tokens.device),
        "cu_seq_lens_q": starts, "cu_seq_lens_k": starts,
        "max_length_q": longest, "max_length_k": longest,
    }
    if "token_type_ids" in inputs:
        kwargs["token_type_ids"] = inputs["token_type_ids"][tokens][None]
    return Stream(tokens, kwargs)


def unpack(stream: Stream, hidden: torch.Tensor) -> torch.Tensor:
    """[1, tokens, width] -> [rows, longest, width], zeros where the rows were padded."""
    padded = hidden.new_zeros(*stream.tokens.shape, hidden.shape[-1])
    return padded.index_put((stream.tokens,), hidden[0])


def encode(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The encoder's last hidden states for a padded micro-batch, computed packed."""
    embeddings = getattr(encoder, "embeddings", None)
    # RoBERTa-style position ids start after the padding index; BERT's at 0; BART's offset is
    # added by its own position embedding.
    offset = embeddings.padding_idx + 1 if hasattr(embeddings, "padding_idx") else 0
    stream = pack(inputs, offset)
    kwargs = dict(stream.kwargs)
    if hasattr(encoder, "embed_positions"):  # BART: see _stream_positions
        token = _STREAM_POSITIONS.set(kwargs.pop("position_ids")[0])
        try:
            return unpack(stream, encoder(**kwargs).last_hidden_state)
        finally:
            _STREAM_POSITIONS.reset(token)
    return unpack(stream, encoder(**kwargs).last_hidden_state)


def _stream_positions(module: nn.Embedding, forward, *args, **kwargs) -> torch.Tensor:
    """BART's position embedding: the stream's row positions while one is encoded."""
    positions = _STREAM_POSITIONS.get()
    if positions is None:
        return forward(module, *args, **kwargs)
    return nn.Embedding.forward(module, positions[None] + module.offset)
