"""An elastic decoder-only transformer: one set of weights, many nested sizes.

:class:`ElasticGPT` is a small GPT (token + learned position embeddings, pre-LayerNorm
blocks, a linear head) whose width can be masked per sample along four axes:

- ``width``  embedding channels of the residual stream (a prefix of the channels);
- ``heads``  attention heads of every layer (a prefix of each layer's heads);
- ``ffn``    MLP neurons of every layer (a prefix of each layer's neurons);
- ``depth``  layers (the most important ones by ``layer_rank``; the others are skipped).

After :func:`stagetrain.elastic.importance.rank_and_permute` the prefixes are the most
important components, so every budget is a prefix of every larger one (nested). Masked
components are exactly zero and LayerNorm statistics run over the kept channels only,
so a masked forward pass equals the forward pass of a really smaller model
(:func:`stagetrain.elastic.extract.extract`).

Budgets reach the model inside the token ids: token ``t`` of a sample assigned budget
``b`` is fed as ``t + vocab * b`` (see :mod:`stagetrain.elastic.data`). The tags ride
unchanged through batching, sharding, sequence truncation and gradient accumulation;
the model strips them. Untagged samples get budget 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stagetrain.elastic.router import AXES, BudgetRouter, BudgetSpec, param_count

LN_EPS = 1e-5


@dataclass
class Masks:
    """Per-sample masks for one forward pass (1 = kept, 0 = masked)."""

    channels: torch.Tensor  # (B, 1, width)
    heads: torch.Tensor  # (B, heads, 1, 1)
    neurons: torch.Tensor  # (B, 1, ffn)
    layers: torch.Tensor  # (B, layers)


def masked_layer_norm(
    x: torch.Tensor, norm: nn.LayerNorm, mask: torch.Tensor | None
) -> torch.Tensor:
    """LayerNorm over the kept channels only; masked channels come out as zero."""
    if mask is None:
        return norm(x)
    kept = mask.sum(-1, keepdim=True)
    mean = (x * mask).sum(-1, keepdim=True) / kept
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / kept
    return (centred * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias) * mask


class ElasticBlock(nn.Module):
    """A pre-LayerNorm transformer block that honours :class:`Masks`."""

    def __init__(self, width: int, heads: int, head_dim: int, ffn: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.ln1 = nn.LayerNorm(width, eps=LN_EPS)
        self.qkv = nn.Linear(width, 3 * inner)
        self.proj = nn.Linear(inner, width)
        self.ln2 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, ffn)
        self.fc2 = nn.Linear(ffn, width)

    def attention_heads(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head attention outputs ``(B, heads, T, head_dim)`` of normalised input ``h``."""
        b, t, _ = h.shape
        q, k, v = self.qkv(h).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(
        self,
        x: torch.Tensor,
        masks: Masks | None = None,
        layer: int = 0,
        stats: dict[str, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        channels = masks.channels if masks is not None else None
        gate = masks.layers[:, layer, None, None] if masks is not None else None
        b, t, _ = x.shape

        h = masked_layer_norm(x, self.ln1, channels)
        heads = self.attention_heads(h)
        if masks is not None:
            heads = heads * masks.heads
        delta = self.proj(heads.transpose(1, 2).reshape(b, t, -1))
        if channels is not None:
            delta = delta * channels * gate
        if stats is not None:
            stats["ln"].append(h)
            stats["heads"].append(heads.norm(dim=-1).mean(dim=(0, 2)))
        x = x + delta

        h = masked_layer_norm(x, self.ln2, channels)
        hidden = F.gelu(self.fc1(h))
        if masks is not None:
            hidden = hidden * masks.neurons
        delta = self.fc2(hidden)
        if channels is not None:
            delta = delta * channels * gate
        if stats is not None:
            stats["ln"].append(h)
            stats["neurons"].append(hidden.abs().mean(dim=(0, 1)))
        return x + delta


class ElasticGPT(nn.Module):
    """A GPT with maskable width, heads, MLP neurons and depth, optionally with a router.

    Without ``budgets`` it is a plain GPT (the teacher, or an extracted submodel). With
    ``budgets`` and ``choices`` it carries a :class:`BudgetRouter` that turns each
    sample's budget into masks; ``router_loss`` then holds the last forward pass's cost
    term (read by :func:`stagetrain.elastic.losses.router_loss`).

    Args:
        vocab, context, width, heads, head_dim, ffn, layers: the architecture.
        budgets: ``[{"name": ..., "target": fraction of the full model's parameters}]``;
            a sample tagged ``b`` uses ``budgets[b]``.
        choices: per axis (``width``, ``heads``, ``ffn``, ``depth``) the sizes the router
            may pick, ascending; each must end with the full size.
        router: keyword arguments of :class:`BudgetRouter` (hidden size, annealing).
    """

    layer_rank: torch.Tensor

    def __init__(
        self,
        *,
        vocab: int = 256,
        context: int = 256,
        width: int = 128,
        heads: int = 4,
        head_dim: int = 32,
        ffn: int = 512,
        layers: int = 4,
        budgets: list[dict[str, Any]] | None = None,
        choices: dict[str, list[int]] | None = None,
        router: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.arch = {
            "vocab": vocab, "context": context, "width": width, "heads": heads,
            "head_dim": head_dim, "ffn": ffn, "layers": layers,
        }  # fmt: skip
        self.vocab, self.context = vocab, context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(
            ElasticBlock(width, heads, head_dim, ffn) for _ in range(layers)
        )
        self.ln = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, vocab)
        # Rank of each layer by importance (0 = most important): depth d keeps rank < d.
        self.register_buffer("layer_rank", torch.arange(layers))
        self.router: BudgetRouter | None = None
        self.router_loss: torch.Tensor | None = None
        if budgets is not None or choices is not None:
            if budgets is None or choices is None:
                raise ValueError("an elastic model needs both 'budgets' and 'choices'")
            full = {"width": width, "heads": heads, "ffn": ffn, "depth": layers}
            specs = [BudgetSpec(**b) for b in budgets]
            self.router = BudgetRouter(specs, choices, full=full, arch=self.arch, **(router or {}))

    @property
    def input_vocab_size(self) -> int:
        """Input ids this model accepts: budget-tagged ids reach ``vocab * budgets``."""
        budgets = len(self.router.budgets) if self.router is not None else 1
        return self.vocab * budgets

    @property
    def full_params(self) -> int:
        """Parameters of the full model (the router's excluded)."""
        return param_count(**self.arch)

    def split_tags(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token ids, budget index per sample)`` of budget-tagged ids."""
        return tokens.remainder(self.vocab), tokens[:, 0].div(self.vocab, rounding_mode="floor")

    def masks_for(self, selection: dict[str, torch.Tensor]) -> Masks:
        """Masks from per-sample one-hot choices ``{axis: (B, n_choices)}``."""
        assert self.router is not None
        out = {}
        for axis in AXES:
            keep = self.router.keep_matrix(axis, self.layer_rank)  # (n_choices, size)
            out[axis] = selection[axis] @ keep
        b = out["width"].shape[0]
        return Masks(
            channels=out["width"].view(b, 1, -1),
            heads=out["heads"].view(b, -1, 1, 1),
            neurons=out["ffn"].view(b, 1, -1),
            layers=out["depth"],
        )

    def forward(
        self,
        tokens: torch.Tensor,
        stats: dict[str, list[torch.Tensor]] | None = None,
        skip: tuple[int, ...] = (),
    ) -> torch.Tensor:
        """Logits for (optionally budget-tagged) ``tokens``.

        ``stats`` (a dict of lists ``ln``/``heads``/``neurons``) collects activations for
        importance ranking; ``skip`` leaves out layers (for depth importance).
        """
        tokens, budget = self.split_tags(tokens)
        masks = None
        if self.router is not None:
            selection, self.router_loss = self.router(budget, training=self.training)
            masks = self.masks_for(selection)
        t = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        if masks is not None:
            x = x * masks.channels
        if stats is not None:
            stats["ln"].append(x)
        for index, block in enumerate(self.blocks):
            if index in skip:
                continue
            x = block(x, masks, index, stats)
        h = masked_layer_norm(x, self.ln, masks.channels if masks is not None else None)
        if stats is not None:
            stats["ln"].append(h)
        return self.head(h)


def elastic_gpt(**kwargs: Any) -> ElasticGPT:
    """Factory for configs (``model: {builtin: elastic_gpt, args: {...}}``)."""
    return ElasticGPT(**kwargs)
