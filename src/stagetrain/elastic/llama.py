"""The Llama family (``LlamaForCausalLM``): RMSNorm, grouped-query attention, SwiGLU.

Parameter names and shapes are those of ``transformers``' Llama implementation; the
masking hooks attach to its modules (nothing of its code is copied). SwiGLU's gate and
up projections share one neuron index, so they are ranked, permuted and sliced
together; the rotary embedding has no parameters and is untouched by width pruning
(it acts within each head). Tied and untied output layers are both handled.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from stagetrain.elastic.family import (
    LayerSize,
    LayerSlots,
    Layout,
    Rule,
    Sizes,
    kv_heads_kept,
)
from stagetrain.errors import ConfigError

LAYER = "model.layers.{l}."


class LlamaFamily:
    """The elastic description of a ``LlamaForCausalLM`` (see :mod:`.family`)."""

    name: str = "llama"
    prefix: str = ""
    exclude: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        config: Any = model.config
        self.config = config
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        self.sizes = Sizes(
            width=int(config.hidden_size),
            heads=heads,
            kv_heads=kv,
            head_dim=int(head_dim),
            ffn=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
        )
        self.vocab = int(config.vocab_size)
        self.max_length = int(getattr(config, "max_position_embeddings", 2048))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.attention_bias = bool(getattr(config, "attention_bias", False))
        self.mlp_bias = bool(getattr(config, "mlp_bias", False))
        attn = LAYER + "self_attn."
        self.rules: tuple[Rule, ...] = (
            Rule("model.embed_tokens.weight", (None, "channels")),
            Rule(attn + "q_proj.weight", ("q", "channels")),
            Rule(attn + "q_proj.bias", ("q",)),
            Rule(attn + "k_proj.weight", ("kv", "channels")),
            Rule(attn + "k_proj.bias", ("kv",)),
            Rule(attn + "v_proj.weight", ("kv", "channels")),
            Rule(attn + "v_proj.bias", ("kv",)),
            Rule(attn + "o_proj.weight", ("channels", "q")),
            Rule(attn + "o_proj.bias", ("channels",)),
            Rule(LAYER + "mlp.gate_proj.weight", ("neurons", "channels")),
            Rule(LAYER + "mlp.gate_proj.bias", ("neurons",)),
            Rule(LAYER + "mlp.up_proj.weight", ("neurons", "channels")),
            Rule(LAYER + "mlp.up_proj.bias", ("neurons",)),
            Rule(LAYER + "mlp.down_proj.weight", ("channels", "neurons")),
            Rule(LAYER + "mlp.down_proj.bias", ("channels",)),
            Rule(LAYER + "input_layernorm.weight", ("channels",)),
            Rule(LAYER + "post_attention_layernorm.weight", ("channels",)),
            Rule("model.norm.weight", ("channels",)),
            Rule("lm_head.weight", (None, "channels")),
        )

    def layout(self, model: nn.Module) -> Layout:
        inner: Any = model.model
        layers = []
        for block in inner.layers:
            layers.append(
                LayerSlots(
                    block=block,
                    norms=[block.input_layernorm, block.post_attention_layernorm],
                    head_input=block.self_attn.o_proj,
                    neuron_input=block.mlp.down_proj,
                    pre_activation=[block.mlp.gate_proj, block.mlp.up_proj],
                    residual_outputs=[block.self_attn.o_proj, block.mlp.down_proj],
                )
            )
        return Layout(
            embeddings=[inner.embed_tokens], final_norm=inner.norm, layers=layers, norm="rms"
        )

    def base_params(self, width: Any) -> Any:
        head = 0 if self.tied else self.vocab * width
        return self.vocab * width + width + head

    def layer_params(self, width: Any, heads: Any, ffn: Any) -> Any:
        d = self.sizes.head_dim
        kv = self.sizes.kv_heads if self.sizes.grouped else heads
        attention = width * d * (heads + 2 * kv) + heads * d * width
        if self.attention_bias:
            attention = attention + d * (heads + 2 * kv) + width
        mlp = 3 * width * ffn
        if self.mlp_bias:
            mlp = mlp + 2 * ffn + width
        return 2 * width + attention + mlp

    def _config(self, width: int, layer: LayerSize, count: int) -> Any:
        config = copy.deepcopy(self.config)
        config.hidden_size = width
        config.num_attention_heads = layer.heads
        config.num_key_value_heads = kv_heads_kept(layer.heads, self.sizes)
        config.head_dim = self.sizes.head_dim
        config.intermediate_size = layer.ffn
        config.num_hidden_layers = count
        return config

    def hf_config(self, width: int, layers: list[LayerSize]) -> Any:
        if len(set(layers)) > 1:
            raise ConfigError(
                "--format hf: Llama's config holds one num_attention_heads and one "
                "intermediate_size for all layers, but this heterogeneous configuration "
                f"keeps {[(s.heads, s.ffn) for s in layers]} (heads, MLP) per layer: "
                "export with --format stagetrain"
            )
        config = self._config(width, layers[0], len(layers))
        check_loadable(config)
        return config

    def _triples(self, layers: list[LayerSize]) -> list[list[int]]:
        return [[s.heads, kv_heads_kept(s.heads, self.sizes), s.ffn] for s in layers]

    def build_child(self, width: int, layers: list[LayerSize]) -> nn.Module:
        config = self._config(width, layers[0], len(layers)).to_dict()
        return build_llama(config, self._triples(layers))

    def child_spec(self, width: int, layers: list[LayerSize]) -> dict[str, Any]:
        config = self._config(width, layers[0], len(layers)).to_dict()
        return {"builtin": "hf_sliced", "args": {"config": config, "layers": self._triples(layers)}}


def build_llama(config: dict[str, Any], layers: list[list[int]]) -> nn.Module:
    """A blank ``LlamaForCausalLM`` of ``config`` whose layer ``i`` keeps ``layers[i]`` =
    ``[query heads, key/value heads, MLP neurons]``: layers that differ from the config
    get resized projections, so per-layer (heterogeneous) children load too."""
    from transformers import AutoModelForCausalLM

    cfg = unchecked_config(config)
    model = AutoModelForCausalLM.from_config(cfg)
    d, width = cfg.head_dim, cfg.hidden_size
    for block, (heads, kv, ffn) in zip(model.model.layers, layers, strict=True):
        attn, mlp = block.self_attn, block.mlp
        if (heads, kv) != (cfg.num_attention_heads, cfg.num_key_value_heads):
            bias = cfg.attention_bias
            attn.q_proj = nn.Linear(width, heads * d, bias=bias)
            attn.k_proj = nn.Linear(width, kv * d, bias=bias)
            attn.v_proj = nn.Linear(width, kv * d, bias=bias)
            attn.o_proj = nn.Linear(heads * d, width, bias=bias)
            # The attention reads the query heads per key/value head from this attribute.
            attn.num_key_value_groups = heads // kv
        if ffn != cfg.intermediate_size:
            bias = cfg.mlp_bias
            mlp.gate_proj = nn.Linear(width, ffn, bias=bias)
            mlp.up_proj = nn.Linear(width, ffn, bias=bias)
            mlp.down_proj = nn.Linear(ffn, width, bias=bias)
            mlp.intermediate_size = ffn
    return model


def check_loadable(config: Any) -> None:
    """Raise a one-line :class:`ConfigError` when the installed ``transformers`` would
    refuse to save or load ``config`` (its strict validation, e.g. transformers 5's
    ``hidden_size`` a multiple of ``num_attention_heads`` even with ``head_dim`` set)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return  # a release without strict configs: what it builds, it loads
    try:
        validate()
    except Exception as exc:
        import transformers

        cause = str(exc.__cause__ or exc).strip().splitlines()[-1].strip()
        raise ConfigError(
            f"--format hf: transformers {transformers.__version__} refuses this child's "
            f"config ({cause}): export with --format stagetrain, which holds any "
            "configuration, or offer width choices that are multiples of every heads choice"
        ) from None


def unchecked_config(fields: dict[str, Any]) -> Any:
    """The ``transformers`` config of ``fields`` even where its strict validation refuses
    the shapes (a width that is not a multiple of the query heads, with ``head_dim`` set):
    the model computes them exactly, so the stagetrain format builds it from a valid
    stand-in config whose width is then set (assignment is not validated)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**fields)
    except Exception:
        heads, head_dim = fields.get("num_attention_heads"), fields.get("head_dim")
        if not heads or not head_dim or "hidden_size" not in fields:
            raise
    config = AutoConfig.for_model(**{**fields, "hidden_size": heads * head_dim})
    config.hidden_size = fields["hidden_size"]
    return config
