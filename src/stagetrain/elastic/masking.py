"""Per-sample masks applied through forward hooks, and importance statistics.

:class:`MaskHooks` attaches hooks to the modules of a :class:`~.family.Layout` once;
they do nothing until :meth:`MaskHooks.apply` sets masks for one forward pass:

- embedding outputs and every output added to the residual stream are multiplied by
  the channel mask, so masked channels of the residual stream stay exactly zero;
- every norm (RMSNorm or LayerNorm) is recomputed over the kept channels only — the
  masked-channel correction: ``x * rsqrt(sum(x^2 * m) / sum(m) + eps) * w * m`` for
  RMSNorm, the same with the kept channels' mean and variance for LayerNorm;
- the attention output projection's input (the heads, head-major) and the MLP down
  projection's input (the neurons) are multiplied by the head and neuron masks;
- a decoder layer that a sample drops returns its input for that sample:
  ``out = x + gate * (layer(x) - x)``.

Masks are cast to each activation's dtype, so half-precision models stay in theirs.
Activation checkpointing is refused with budgets: its recomputation runs in the
backward pass, outside the forward pass's masks.

A masked forward pass therefore computes what a really smaller model computes
(:mod:`~stagetrain.elastic.extract`), while training still runs the full model's
compute for every sample. The same hooks record importance statistics (norm outputs,
head output norms, MLP pre- and post-activations) and can drop layers for every
sample (depth importance). Hooks are small objects holding a reference to their
:class:`MaskHooks`, so ``copy.deepcopy`` of a model yields hooks bound to the copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stagetrain.elastic.family import Layout, Sizes

KEEP = object()
"""Default of :meth:`MaskHooks.apply`'s arguments: leave that setting as it is."""


@dataclass
class Masks:
    """Per-sample masks for one forward pass (1 = kept, 0 = masked); ``None`` = all kept."""

    channels: torch.Tensor | None  # (B, 1, width)
    heads: list[torch.Tensor | None]  # per layer (B, 1, heads * head_dim)
    neurons: list[torch.Tensor | None]  # per layer (B, 1, ffn)
    layers: torch.Tensor | None  # (B, layers)


@dataclass
class Recorder:
    """Sums of importance statistics over the forward passes it was active in.

    Per batch: the mean over samples and positions (weighted by ``token_weights`` when
    set, e.g. an attention mask) of ``|norm output|`` per channel (summed over every
    norm), the L2 norm of each head's attention output, and ``|.|`` of each neuron's
    pre-activation (summed over the first MLP projections: gate and up together for
    SwiGLU) and post-activation (the down projection's input).
    """

    layers: int
    channels: torch.Tensor | None = None
    heads: list[torch.Tensor | None] = field(default_factory=list)
    pre: list[torch.Tensor | None] = field(default_factory=list)
    post: list[torch.Tensor | None] = field(default_factory=list)
    token_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.heads = [None] * self.layers
        self.pre = [None] * self.layers
        self.post = [None] * self.layers

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over every dimension but the last, weighted by the token weights."""
        values = values.detach().double()
        if self.token_weights is None or values.dim() != 3:
            return values.reshape(-1, values.shape[-1]).mean(0)
        w = self.token_weights.to(values.device).double()[..., None]
        return (values * w).sum((0, 1)) / w.sum().clamp(min=1)

    @staticmethod
    def add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if total is None else total + value


def masked_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """``module`` (an RMSNorm or LayerNorm over the last dimension) over the channels where
    ``mask`` is 1; masked channels come out as zero."""
    weight: Any = module.weight
    bias: Any = getattr(module, "bias", None)
    kept = mask.sum(-1, keepdim=True)
    if kind == "rms":
        # Hugging Face RMSNorms call it variance_epsilon, torch's RMSNorm eps.
        eps: Any = getattr(module, "variance_epsilon", None)
        eps = float(eps if eps is not None else getattr(module, "eps", None) or 1e-6)
        dtype = x.dtype
        h = x.float()
        variance = (h * h * mask).sum(-1, keepdim=True) / kept
        return weight * (h * torch.rsqrt(variance + eps)).to(dtype) * mask
    eps_ln: float = getattr(module, "eps", 1e-5)
    mean = (x * mask).sum(-1, keepdim=True) / kept
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / kept
    out = centred * torch.rsqrt(var + eps_ln) * weight
    if bias is not None:
        out = out + bias
    return out * mask


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: torch.Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


class _Hook:
    def __init__(self, owner: MaskHooks, layer: int | None = None) -> None:
        self.owner = owner
        self.layer = layer


class _ChannelOutput(_Hook):
    """Embedding and residual-branch outputs: zero on masked channels."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        masks = self.owner.masks
        if masks is None or masks.channels is None:
            return None
        out = _first(output)
        return _replace_first(output, out * masks.channels.to(out.dtype))


class _Norm(_Hook):
    """Norms: recomputed over the kept channels; record their outputs."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        owner = self.owner
        masks = owner.masks
        if masks is not None and masks.channels is not None:
            x = args[0]
            output = masked_norm(module, x, masks.channels.to(x.dtype), owner.layout.norm)
        recorder = owner.recorder
        if recorder is not None:
            recorder.channels = recorder.add(recorder.channels, recorder.mean(output.abs()))
        return output if masks is not None and masks.channels is not None else None


class _MaskedInput(_Hook):
    """A projection's input: an importance statistic recorded, then units masked (which
    statistic and which mask: the subclasses)."""

    def record(self, recorder: Recorder, layer: int, x: torch.Tensor) -> None:
        raise NotImplementedError

    def mask(self, masks: Masks, layer: int) -> torch.Tensor | None:
        raise NotImplementedError

    def __call__(self, module: nn.Module, args: Any) -> Any:
        layer = self.layer
        assert layer is not None
        x = args[0]
        if self.owner.recorder is not None:
            self.record(self.owner.recorder, layer, x)
        masks = self.owner.masks
        mask = None if masks is None else self.mask(masks, layer)
        if mask is None:
            return None
        return (x * mask.to(x.dtype), *args[1:])


class _HeadInput(_MaskedInput):
    """Attention output projection's input: per-head norms recorded, heads masked."""

    def record(self, recorder: Recorder, layer: int, x: torch.Tensor) -> None:
        per_head = x.unflatten(-1, (-1, self.owner.sizes.head_dim)).norm(dim=-1)
        recorder.heads[layer] = recorder.add(recorder.heads[layer], recorder.mean(per_head))

    def mask(self, masks: Masks, layer: int) -> torch.Tensor | None:
        return masks.heads[layer]


class _NeuronInput(_MaskedInput):
    """MLP down projection's input: post-activations recorded, neurons masked."""

    def record(self, recorder: Recorder, layer: int, x: torch.Tensor) -> None:
        recorder.post[layer] = recorder.add(recorder.post[layer], recorder.mean(x.abs()))

    def mask(self, masks: Masks, layer: int) -> torch.Tensor | None:
        return masks.neurons[layer]


class _PreActivation(_Hook):
    """First MLP projections: pre-activations recorded."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        recorder, layer = self.owner.recorder, self.layer
        assert layer is not None
        if recorder is not None:
            recorder.pre[layer] = recorder.add(recorder.pre[layer], recorder.mean(output.abs()))


class _Layer(_Hook):
    """Decoder layers: dropped (for every sample, or per sample by the depth gate)."""

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        owner, layer = self.owner, self.layer
        x = args[0] if args else kwargs["hidden_states"]
        if layer in owner.skip:
            return _replace_first(output, x)
        masks = owner.masks
        if masks is None or masks.layers is None:
            return None
        gate = masks.layers[:, layer, None, None].to(x.dtype)
        out = _first(output)
        return _replace_first(output, x + gate * (out - x))


class MaskHooks:
    """The hooks of one model (see the module docstring)."""

    def __init__(self, layout: Layout, sizes: Sizes) -> None:
        self.layout = layout
        self.sizes = sizes
        self.masks: Masks | None = None
        self.skip: frozenset[int] = frozenset()
        self.recorder: Recorder | None = None
        # No handles are kept: a deep copy of the model copies the hooks (and this
        # object with them), but a handle would still point at the original's modules.
        for module in layout.embeddings:
            module.register_forward_hook(_ChannelOutput(self))
        for layer, slots in enumerate(layout.layers):
            for module in slots.residual_outputs:
                module.register_forward_hook(_ChannelOutput(self))
            for module in slots.norms:
                module.register_forward_hook(_Norm(self))
            slots.head_input.register_forward_pre_hook(_HeadInput(self, layer))
            slots.neuron_input.register_forward_pre_hook(_NeuronInput(self, layer))
            for module in slots.pre_activation:
                module.register_forward_hook(_PreActivation(self, layer))
            slots.block.register_forward_hook(_Layer(self, layer), with_kwargs=True)
        layout.final_norm.register_forward_hook(_Norm(self))

    @contextmanager
    def apply(
        self,
        masks: Masks | object | None = KEEP,
        *,
        skip: tuple[int, ...] | frozenset[int] | object = KEEP,
        recorder: Recorder | object | None = KEEP,
    ) -> Iterator[None]:
        """Masks, dropped layers and a statistics recorder for the forward passes inside;
        what is not given stays as the enclosing ``apply`` set it."""
        previous = (self.masks, self.skip, self.recorder)
        if masks is not KEEP:
            self.masks = masks  # type: ignore[assignment]
        if skip is not KEEP:
            self.skip = frozenset(skip)  # type: ignore[arg-type]
        if recorder is not KEEP:
            self.recorder = recorder  # type: ignore[assignment]
        try:
            yield
        finally:
            self.masks, self.skip, self.recorder = previous
