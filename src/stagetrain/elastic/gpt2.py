"""The GPT-2 family (``GPT2LMHeadModel``): LayerNorm, fused q/k/v, GELU MLP.

Parameter names and shapes are those of ``transformers``' GPT-2 (``Conv1D`` weights are
stored ``(in, out)``). GPT-2's config ties the attention width to the residual width
(``n_embd = n_head * head_dim``), so a child whose kept width differs from its heads
times the head size has no GPT-2 config; it still loads from the stagetrain format
(:func:`build_gpt2` resizes the projections), and ``--format hf`` says so.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from stagetrain.elastic.family import LayerSize, LayerSlots, Layout, Rule, Sizes
from stagetrain.errors import ConfigError

LAYER = "transformer.h.{l}."


class GPT2Family:
    """The elastic description of a ``GPT2LMHeadModel`` (see :mod:`.family`)."""

    name: str = "gpt2"
    prefix: str = ""
    exclude: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        config: Any = model.config
        if getattr(config, "add_cross_attention", False):
            raise ConfigError("elastic: GPT-2 with cross-attention is not supported")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            # The scale follows the layer's index, which changes when layers are dropped.
            raise ConfigError(
                "elastic: GPT-2 with scale_attn_by_inverse_layer_idx is not supported"
            )
        self.config = config
        width, heads = int(config.n_embd), int(config.n_head)
        self.sizes = Sizes(
            width=width,
            heads=heads,
            kv_heads=heads,
            head_dim=width // heads,
            ffn=int(config.n_inner or 4 * width),
            layers=int(config.n_layer),
        )
        self.vocab = int(config.vocab_size)
        self.positions = int(config.n_positions)
        self.max_length = self.positions
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.rules: tuple[Rule, ...] = (
            Rule("transformer.wte.weight", (None, "channels")),
            Rule("transformer.wpe.weight", (None, "channels")),
            Rule(LAYER + "ln_1.weight", ("channels",)),
            Rule(LAYER + "ln_1.bias", ("channels",)),
            Rule(LAYER + "attn.c_attn.weight", ("channels", "qkv")),
            Rule(LAYER + "attn.c_attn.bias", ("qkv",)),
            Rule(LAYER + "attn.c_proj.weight", ("q", "channels")),
            Rule(LAYER + "attn.c_proj.bias", ("channels",)),
            Rule(LAYER + "ln_2.weight", ("channels",)),
            Rule(LAYER + "ln_2.bias", ("channels",)),
            Rule(LAYER + "mlp.c_fc.weight", ("channels", "neurons")),
            Rule(LAYER + "mlp.c_fc.bias", ("neurons",)),
            Rule(LAYER + "mlp.c_proj.weight", ("neurons", "channels")),
            Rule(LAYER + "mlp.c_proj.bias", ("channels",)),
            Rule("transformer.ln_f.weight", ("channels",)),
            Rule("transformer.ln_f.bias", ("channels",)),
            Rule("lm_head.weight", (None, "channels")),
        )

    def layout(self, model: nn.Module) -> Layout:
        inner: Any = model.transformer
        layers = [
            LayerSlots(
                block=block,
                norms=[block.ln_1, block.ln_2],
                head_input=block.attn.c_proj,
                neuron_input=block.mlp.c_proj,
                pre_activation=[block.mlp.c_fc],
                residual_outputs=[block.attn.c_proj, block.mlp.c_proj],
            )
            for block in inner.h
        ]
        return Layout(
            embeddings=[inner.wte, inner.wpe], final_norm=inner.ln_f, layers=layers, norm="layer"
        )

    def base_params(self, width: Any) -> Any:
        head = 0 if self.tied else self.vocab * width
        return (self.vocab + self.positions) * width + 2 * width + head

    def layer_params(self, width: Any, heads: Any, ffn: Any) -> Any:
        inner = heads * self.sizes.head_dim
        attention = width * 3 * inner + 3 * inner + inner * width + width
        mlp = width * ffn + ffn + ffn * width + width
        return 4 * width + attention + mlp

    def _config(self, width: int, layer: LayerSize, count: int) -> Any:
        config = copy.deepcopy(self.config)
        config.n_embd = width
        config.n_head = layer.heads
        config.n_inner = layer.ffn
        config.n_layer = count
        return config

    def hf_config(self, width: int, layers: list[LayerSize]) -> Any:
        if len(set(layers)) > 1:
            raise ConfigError(
                "--format hf: GPT-2's config holds one n_head and one n_inner for all layers, "
                f"but this heterogeneous configuration keeps {[(s.heads, s.ffn) for s in layers]} "
                "(heads, MLP) per layer: export with --format stagetrain"
            )
        heads = layers[0].heads
        if heads * self.sizes.head_dim != width:
            raise ConfigError(
                "--format hf: GPT-2's config ties the attention width to the embedding width "
                f"(n_embd = n_head x head size), but this configuration keeps width {width} "
                f"and {heads} heads of {self.sizes.head_dim}: export with --format stagetrain, "
                f"or offer only widths equal to heads x {self.sizes.head_dim}"
            )
        return self._config(width, layers[0], len(layers))

    def _spec(self, width: int, layers: list[LayerSize]) -> tuple[dict[str, Any], list[list[int]]]:
        # n_head 1 always passes GPT-2's divisibility check; build_gpt2 sets the real heads.
        config = self._config(width, LayerSize(1, layers[0].ffn), len(layers)).to_dict()
        return config, [[s.heads, s.ffn] for s in layers]

    def build_child(self, width: int, layers: list[LayerSize]) -> nn.Module:
        config, sizes = self._spec(width, layers)
        return build_gpt2(config, sizes, head_dim=self.sizes.head_dim)

    def child_spec(self, width: int, layers: list[LayerSize]) -> dict[str, Any]:
        config, sizes = self._spec(width, layers)
        return {
            "builtin": "hf_sliced",
            "args": {"config": config, "layers": sizes, "head_dim": self.sizes.head_dim},
        }


def build_gpt2(config: dict[str, Any], layers: list[list[int]], *, head_dim: int) -> nn.Module:
    """A blank ``GPT2LMHeadModel`` of ``config`` whose layer ``i`` keeps ``layers[i]`` =
    ``[heads, MLP neurons]`` of ``head_dim`` each, whatever the residual width: the
    attention projections are resized and the attention told its head count."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg)
    width = cfg.n_embd
    for block, (heads, ffn) in zip(model.transformer.h, layers, strict=True):
        attn, mlp = block.attn, block.mlp
        inner = heads * head_dim
        attn.c_attn = Conv1D(3 * inner, width)
        attn.c_proj = Conv1D(width, inner)
        # GPT2Attention splits q/k/v at split_size and views heads of head_dim.
        attn.num_heads, attn.head_dim, attn.split_size = heads, head_dim, inner
        attn.scaling = head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        mlp.c_fc = Conv1D(ffn, width)
        mlp.c_proj = Conv1D(width, ffn)
    return model
