"""A small GPT-style causal language model built from a config, trainable on a CPU.

Pre-LayerNorm decoder blocks (``h = h + attn(ln1(h)); h = h + mlp(ln2(h))``), learned
positional embeddings, causal multi-head attention through ``F.scaled_dot_product_attention``,
a tanh-GELU MLP and an output head tied to the token embedding -- GPT-2's layout, small enough to
train from scratch on the CPU for the replacement-aware study. Optional dropout (GPT-2's places:
on the embeddings and on each sublayer's output before it is added to the residual stream) acts
only in training mode.

Every block's MLP is its own submodule computing exactly ``down(gelu(up(x)))`` (no residual, no
norm, no dropout: that sits in the block), so replacing it is a plain module swap at
``gpt_mlp_path(layer)`` == ``"blocks.{layer}.mlp"`` (see ``molt_kernels.interp.replace``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a :class:`GPT`; ``d_model`` must be divisible by ``n_heads``;
    ``dropout`` in [0, 1)."""

    vocab_size: int
    context: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "d_mlp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")


class GPTMLP(nn.Module):
    """``y = down(gelu_tanh(up(x)))``: [..., d_model] -> [..., d_model]."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp)
        self.down = nn.Linear(d_mlp, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with its output projection: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = (
            z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
            for z in self.qkv(h).split(d, dim=-1)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = GPTMLP(cfg.d_model, cfg.d_mlp)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.drop(self.attn(self.ln1(h)))
        return h + self.drop(self.mlp(self.ln2(h)))


class GPT(nn.Module):
    """Decoder-only LM: token ids [B, T] (T <= context) -> next-token logits [B, T, vocab]."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embedding = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, and the projections that write into
        the residual stream scaled by 1/sqrt(2 n_layers) so its variance stays O(1) in depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    def forward(self, input_ids: Tensor) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] > self.cfg.context:
            raise ValueError(
                f"input_ids must be [batch, T] with T <= context={self.cfg.context}, got "
                f"{tuple(input_ids.shape)}"
            )
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.drop(self.token_embedding(input_ids) + self.position_embedding(pos))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.token_embedding.weight.T

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats) of windows ``tokens`` [B, T + 1] int64."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def gpt_mlp_path(layer: int) -> str:
    """Module path of block ``layer``'s MLP (``down(gelu(up(x)))``, [..., d] -> [..., d])."""
    return f"blocks.{layer}.mlp"
