"""ElasticGPT: a small GPT that is one more user of the elastic machinery.

:class:`ElasticGPT` is a plain GPT (token + learned position embeddings, pre-LayerNorm
blocks, a linear head with bias). Its elasticity is the same as any Hugging Face
model's: :class:`GPTFamily` describes it, :class:`~stagetrain.elastic.masking.MaskHooks`
mask it, :class:`~stagetrain.elastic.router.BudgetRouter` chooses the sizes (see
:mod:`stagetrain.elastic.core`).

The budget is passed beside the tokens, never inside them: ``model(tokens,
budget=...)``, or a dict batch ``{"input_ids", "labels", "budget"}`` (the
``elastic_text`` source, :mod:`stagetrain.elastic.data`) called as ``model(**batch)``.
Without ``budget`` the model computes its full size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stagetrain.elastic.core import budget_index, build_router, route
from stagetrain.elastic.family import Family, LayerSize, LayerSlots, Layout, Rule, Sizes
from stagetrain.elastic.masking import MaskHooks
from stagetrain.errors import ConfigError

LN_EPS = 1e-5


def param_count(
    *, vocab: Any, context: Any, width: Any, heads: Any, head_dim: Any, ffn: Any, layers: Any
) -> Any:
    """Parameters of an :class:`ElasticGPT` of these (uniform) sizes; ints or tensors."""
    family = _Counts(vocab, context, head_dim)
    return family.base_params(width) + layers * family.layer_params(width, heads, ffn)


class _Counts:
    def __init__(self, vocab: int, context: int, head_dim: int) -> None:
        self.vocab, self.context, self.head_dim = vocab, context, head_dim

    def base_params(self, width: Any) -> Any:
        # Token and position embeddings, final LayerNorm, head with bias.
        return (self.vocab + self.context) * width + 2 * width + width * self.vocab + self.vocab

    def layer_params(self, width: Any, heads: Any, ffn: Any) -> Any:
        inner = heads * self.head_dim
        attention = width * 3 * inner + 3 * inner + inner * width + width
        mlp = width * ffn + ffn + ffn * width + width
        return 4 * width + attention + mlp


class ElasticBlock(nn.Module):
    """A pre-LayerNorm transformer block (plain; masks come through hooks)."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(heads.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ElasticGPT(nn.Module):
    """A GPT with maskable width, heads, MLP neurons and depth, optionally with a router.

    Without ``budgets`` it is a plain GPT (the teacher, or an extracted submodel). With
    ``budgets`` and ``choices`` it carries a router that turns each sample's budget
    into masks; ``router_loss`` then holds the last forward pass's cost term (read by
    :func:`stagetrain.elastic.losses.router_loss`).

    Args:
        vocab, context, width, heads, head_dim, ffn, layers: the architecture.
        layer_sizes: ``[[heads, ffn], ...]`` per layer for a heterogeneous (extracted)
            model; ``None`` = every layer ``heads`` and ``ffn``.
        budgets: ``[{"name": ..., "target": fraction of the full model's parameters}]``;
            budget index ``b`` is ``budgets[b]``.
        choices: per axis (``width``, ``heads``, ``ffn``, ``depth``) the sizes the router
            may pick, ascending; each must end with the full size.
        router: keyword arguments of :class:`~stagetrain.elastic.router.BudgetRouter`.
        heterogeneous: let every layer have its own heads and MLP width.
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
        layer_sizes: list[list[int]] | None = None,
        budgets: list[dict[str, Any]] | None = None,
        choices: dict[str, list[int]] | None = None,
        router: dict[str, Any] | None = None,
        heterogeneous: bool = False,
    ) -> None:
        super().__init__()
        self.arch: dict[str, Any] = {
            "vocab": vocab, "context": context, "width": width, "heads": heads,
            "head_dim": head_dim, "ffn": ffn, "layers": layers,
        }  # fmt: skip
        if layer_sizes is not None:
            if len(layer_sizes) != layers:
                raise ConfigError(f"layer_sizes: {len(layer_sizes)} entries for {layers} layers")
            self.arch["layer_sizes"] = [list(s) for s in layer_sizes]
        self.vocab, self.context = vocab, context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        per_layer = layer_sizes or [[heads, ffn]] * layers
        self.blocks = nn.ModuleList(ElasticBlock(width, h, head_dim, f) for h, f in per_layer)
        self.ln = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, vocab)
        # Rank of each layer by importance (0 = most important): depth d keeps rank < d.
        self.register_buffer("layer_rank", torch.arange(layers))
        self.family: Family = GPTFamily(self)
        self.hooks = MaskHooks(self.family.layout(self), self.family.sizes)
        if layer_sizes is not None and (budgets is not None or choices is not None):
            raise ConfigError("layer_sizes: a heterogeneous model cannot have budgets")
        self.space, self.router = build_router(self.family, budgets, choices, router, heterogeneous)
        self.router_loss: torch.Tensor | None = None

    @property
    def root(self) -> nn.Module:
        return self

    @property
    def full_params(self) -> int:
        """Parameters of the full model (the router's excluded)."""
        return param_count(**{k: v for k, v in self.arch.items() if k != "layer_sizes"})

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def forward(self, input_ids: torch.Tensor, budget: Any = None) -> torch.Tensor:
        """Logits for ``input_ids`` at ``budget`` (per-sample indices, one index or one
        name; ``None`` = the full model, with no router term). A model without budgets
        ignores ``budget`` (a teacher computes the full model whatever it is given), so
        a dict batch ``{"input_ids", "budget"}`` can be passed as ``model(**batch)`` to
        the student and the teacher alike."""
        self.router_loss = None
        if self.router is None:
            return self._logits(input_ids)
        if budget is None:
            with self.hooks.apply(None):
                return self._logits(input_ids)
        index = budget_index(self.router, budget, input_ids.shape[0], input_ids.device)
        with self.hooks.apply(route(self, index)):
            return self._logits(input_ids)

    def plain_logits(self, batch: Any) -> torch.Tensor:
        with self.hooks.apply(None):
            return self._logits(_tokens(batch))

    def budget_logits(self, batch: Any, budget: int) -> torch.Tensor:
        return self(_tokens(batch), budget=budget)


def _tokens(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, tuple | list):
        return batch[0]
    return batch


class GPTFamily:
    """The elastic description of an :class:`ElasticGPT` (see :mod:`.family`)."""

    name: str = "elastic_gpt"
    prefix: str = ""
    exclude: tuple[str, ...] = ("router.", "layer_rank")

    def __init__(self, model: ElasticGPT) -> None:
        arch = model.arch
        self.arch = dict(arch)
        self.sizes = Sizes(
            width=arch["width"],
            heads=arch["heads"],
            kv_heads=arch["heads"],
            head_dim=arch["head_dim"],
            ffn=arch["ffn"],
            layers=arch["layers"],
        )
        self._counts = _Counts(arch["vocab"], arch["context"], arch["head_dim"])
        self.vocab, self.max_length = arch["vocab"], arch["context"]
        block = "blocks.{l}."
        self.rules: tuple[Rule, ...] = (
            Rule("tokens.weight", (None, "channels")),
            Rule("positions.weight", (None, "channels")),
            *(Rule(block + f"{norm}.{p}", ("channels",))
              for norm in ("ln1", "ln2") for p in ("weight", "bias")),
            Rule(block + "qkv.weight", ("qkv", "channels")),
            Rule(block + "qkv.bias", ("qkv",)),
            Rule(block + "proj.weight", ("channels", "q")),
            Rule(block + "proj.bias", ("channels",)),
            Rule(block + "fc1.weight", ("neurons", "channels")),
            Rule(block + "fc1.bias", ("neurons",)),
            Rule(block + "fc2.weight", ("channels", "neurons")),
            Rule(block + "fc2.bias", ("channels",)),
            Rule("ln.weight", ("channels",)),
            Rule("ln.bias", ("channels",)),
            Rule("head.weight", (None, "channels")),
            Rule("head.bias", (None,)),
        )  # fmt: skip

    def layout(self, model: nn.Module) -> Layout:
        assert isinstance(model, ElasticGPT)
        layers = []
        for block in model.blocks:
            assert isinstance(block, ElasticBlock)
            layers.append(
                LayerSlots(
                    block=block,
                    norms=[block.ln1, block.ln2],
                    head_input=block.proj,
                    neuron_input=block.fc2,
                    pre_activation=[block.fc1],
                    residual_outputs=[block.proj, block.fc2],
                )
            )
        return Layout(
            embeddings=[model.tokens, model.positions],
            final_norm=model.ln,
            layers=layers,
            norm="layer",
        )

    def base_params(self, width: Any) -> Any:
        return self._counts.base_params(width)

    def layer_params(self, width: Any, heads: Any, ffn: Any) -> Any:
        return self._counts.layer_params(width, heads, ffn)

    def _args(self, width: int, layers: list[LayerSize]) -> dict[str, Any]:
        args = {k: v for k, v in self.arch.items() if k != "layer_sizes"}
        args.update(width=width, layers=len(layers))
        if len(set(layers)) > 1:
            args["layer_sizes"] = [[s.heads, s.ffn] for s in layers]
        elif layers:
            args.update(heads=layers[0].heads, ffn=layers[0].ffn)
        return args

    def build_child(self, width: int, layers: list[LayerSize]) -> nn.Module:
        return ElasticGPT(**self._args(width, layers))

    def child_spec(self, width: int, layers: list[LayerSize]) -> dict[str, Any]:
        return {"builtin": "elastic_gpt", "args": self._args(width, layers)}

    def hf_config(self, width: int, layers: list[LayerSize]) -> Any:
        raise ConfigError(
            "--format hf: ElasticGPT has no Hugging Face counterpart (its output layer has a "
            "bias, which GPT-2's tied head cannot hold): export with --format stagetrain"
        )


def elastic_gpt(**kwargs: Any) -> ElasticGPT:
    """Factory for configs (``model: {builtin: elastic_gpt, args: {...}}``)."""
    return ElasticGPT(**kwargs)
