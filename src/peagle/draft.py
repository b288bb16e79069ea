"""The P-EAGLE draft model: config, module and speculators-format checkpoint I/O.

Read top to bottom: `DraftConfig` (HF field names, the checkpoint's config.json), `RMSNorm`, `Rotary`,
`Attention`, `MLP`, `DecoderLayer` (layer 0 is the fused EAGLE-3 first layer), `PEagleDraft`.
One file (~770 lines) because the config, the parameter names and the checkpoint keys are one contract
with vLLM and speculators: a key renamed in one place must be renamed in all, and they sit together.

Data flow of one draft forward over M flat elements (docs/conventions.md):

    hidden[M, H]  = fc(norm?(aux[M, 3·Ht]))  for real slots,  fc(norm?(mask_hidden))  for mask slots
    emb[M, H]     = embed_tokens(input_ids)
    layer 0       : residual = hidden (or hidden_norm(hidden) if norm_before_residual)
                    x = residual + attn(concat(input_layernorm(emb), hidden_norm(hidden)))   # q/k/v from 2H
                    x = x + mlp(post_attention_layernorm(x))
    layers 1..N-1 : plain pre-norm Llama layers
    logits        = lm_head(norm(x))  over the draft vocabulary (draft id i ↔ target id i + d2t[i])

Attention itself is not computed here: each layer computes q, k, v (RoPE applied) and calls the
`attention(layer_idx, q, k, v)` callable given to `forward` (the COD mask lives in `peagle.mask`).
Parameter names are exactly the checkpoint keys vLLM and speculators load (no `model.` prefix).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fsutil import atomic_dir
from .mask_token import validate_mask_token_id
from .target import default_aux_layer_ids

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Version of the speculators checkpoint format we write (the format of speculators 0.9.0's P-EAGLE
# output; informational, vLLM does not read it).
SPECULATORS_VERSION = "0.9.0"

# Fields of `transformer_layer_config` that this draft does not vary: the LlamaConfig defaults that
# speculators also writes. `from_speculators_config` rejects checkpoints that set the ones we would
# otherwise silently ignore (biases, sliding windows).
_LLAMA_FIXED = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "initializer_range": 0.02,
    "mlp_bias": False,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
}
# RoPE types whose frequencies depend on the running sequence length; we build frequencies once.
_UNSUPPORTED_ROPE = ("dynamic", "longrope")
# Keys of a target's rope_parameters that do not apply to a text-only draft whose rotary dim = head_dim.
_DROPPED_ROPE_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")


AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class DraftConfig:
    """Draft hyper-parameters, with Hugging Face field names (they go into `transformer_layer_config`).

    `vocab_size` is the TARGET vocabulary (embed_tokens rows); `draft_vocab_size` the lm_head rows.
    `draft_vocab_size` and `target_hidden_size` are resolved in `__post_init__` (None → vocab_size /
    hidden_size), so code can read them as ints.
    """

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    mask_token_id: int
    head_dim: int | None = None
    num_hidden_layers: int = 4
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    hidden_act: str = "silu"
    draft_vocab_size: int | None = None
    num_aux_layers: int = 3
    target_hidden_size: int | None = None
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    aux_layer_ids: list[int] | None = None
    num_speculative_tokens: int = 8
    verifier_name_or_path: str = ""
    verifier_architectures: list[str] = field(default_factory=list)
    # what identifies the target the draft was trained for (peagle.target.verifier_fingerprint); checked
    # by `peagle eval`, ignored by vLLM and speculators (an extra top-level key of config.json)
    verifier_fingerprint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DraftConfig.{name} must be a positive int, got {value!r}")

        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                     "vocab_size", "num_hidden_layers", "max_position_embeddings", "num_aux_layers",
                     "num_speculative_tokens"):
            positive(name)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        positive("head_dim")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.draft_vocab_size is None:
            self.draft_vocab_size = self.vocab_size
        positive("draft_vocab_size")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"draft_vocab_size {self.draft_vocab_size} exceeds the target vocab_size {self.vocab_size}"
            )
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        positive("target_hidden_size")
        validate_mask_token_id(self.mask_token_id, self.vocab_size)
        if self.norm_before_fc and self.fc_norm:
            raise ValueError("norm_before_fc and fc_norm are mutually exclusive (one pre-fc norm scheme)")
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.aux_layer_ids is not None:
            ids = [int(i) for i in self.aux_layer_ids]
            if len(ids) != self.num_aux_layers:
                raise ValueError(f"aux_layer_ids {ids} must have num_aux_layers={self.num_aux_layers} entries")
            if len(set(ids)) != len(ids) or min(ids) < 0:
                raise ValueError(f"aux_layer_ids {ids} must be distinct non-negative layer ids (vLLM collapses "
                                 "repeats and the fc would get fewer inputs than it was trained on)")
            # vLLM feeds aux states in increasing layer order whatever the config lists; so do we.
            self.aux_layer_ids = sorted(ids)
        elif self.num_aux_layers != 3:
            # The checkpoint records the aux count only through eagle_aux_hidden_state_layer_ids.
            raise ValueError("num_aux_layers != 3 requires explicit aux_layer_ids")
        rope = self.rope_parameters
        if not isinstance(rope, dict) or "rope_type" not in rope or "rope_theta" not in rope:
            raise ValueError(f"rope_parameters must be a dict with rope_type and rope_theta, got {rope!r}")
        if rope["rope_type"] in _UNSUPPORTED_ROPE:
            raise ValueError(
                f"rope_type {rope['rope_type']!r} depends on the running sequence length and is not "
                "supported for the draft; override rope_parameters (e.g. llama3 or yarn)"
            )
        self.verifier_architectures = list(self.verifier_architectures)

    @property
    def fc_in_features(self) -> int:
        """Width of the concatenated aux state entering fc (= num_aux_layers · target_hidden_size)."""
        return self.num_aux_layers * self.target_hidden_size

    def _layer_fields(self) -> dict[str, Any]:
        """The HF layer-config fields this config owns (shared by llama_config and the checkpoint)."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=copy.deepcopy(self.rope_parameters),
        )

    def llama_config(self) -> transformers.LlamaConfig:
        """The equivalent HF LlamaConfig (used for the rotary embedding, so RoPE scaling is HF's)."""
        return transformers.LlamaConfig(**self._layer_fields())

    def to_speculators_config(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json content in the speculators P-EAGLE format (the structure speculators 0.9.0 writes).

        `dtype` is the informational top-level "dtype" field (the tensors' dtype in model.safetensors).
        """
        layer = dict(_LLAMA_FIXED)
        layer.update(
            model_type="llama",
            **self._layer_fields(),
            layer_types=["full_attention"] * self.num_hidden_layers,
            sliding_window=None,
        )
        # speculators writes target_hidden_size null when the target and draft widths agree.
        target_hidden = None if self.target_hidden_size == self.hidden_size else self.target_hidden_size
        aux_ids = None if self.aux_layer_ids is None else list(self.aux_layer_ids)
        return {
            "architectures": ["PEagleDraftModel"],
            "auto_map": {"": "config.PEagleSpeculatorConfig"},
            "speculators_model_type": "peagle",
            "speculators_version": SPECULATORS_VERSION,
            "transformers_version": transformers.__version__,
            "dtype": dtype,
            "draft_vocab_size": self.draft_vocab_size,
            "mask_token_id": self.mask_token_id,
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": self.norm_before_fc,
            "fc_norm": self.fc_norm,
            "norm_output": self.norm_output,
            "embed_requires_grad": True,
            "target_hidden_size": target_hidden,
            "tie_word_embeddings": False,
            "eagle_aux_hidden_state_layer_ids": aux_ids,
            "transformer_layer_config": layer,
            "speculators_config": {
                "algorithm": "peagle",
                "default_proposal_method": "greedy",
                "proposal_methods": [
                    {
                        "proposal_type": "greedy",
                        "speculative_tokens": self.num_speculative_tokens,
                        "verifier_accept_k": 1,
                        "accept_tolerance": 0.0,
                    }
                ],
                "verifier": {
                    "name_or_path": self.verifier_name_or_path,
                    "architectures": list(self.verifier_architectures),
                },
            },
            **({"peagle_verifier_fingerprint": dict(self.verifier_fingerprint)} if self.verifier_fingerprint else {}),
        }

    @classmethod
    def from_speculators_config(cls, d: dict[str, Any]) -> DraftConfig:
        """Inverse of `to_speculators_config`; also reads transformers-4 style rope_theta/rope_scaling.

        Raises ValueError for features this draft does not implement (non-llama layers, biases,
        sliding-window layers), rather than silently loading a different model.
        """
        if d.get("speculators_model_type") != "peagle":
            raise ValueError(
                f"not a P-EAGLE config: speculators_model_type={d.get('speculators_model_type')!r}"
            )
        layer = d.get("transformer_layer_config")
        if not isinstance(layer, dict):
            raise ValueError("config has no transformer_layer_config")
        if layer.get("model_type", "llama") != "llama":
            raise ValueError(
                f"only llama draft layers are supported, got model_type={layer.get('model_type')!r}"
            )
        for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
            if layer.get(key):
                raise ValueError(f"transformer_layer_config.{key}=true is not supported")
        if any(t != "full_attention" for t in layer.get("layer_types") or []):
            raise ValueError(f"only full_attention layers are supported, got {layer['layer_types']}")
        rope = layer.get("rope_parameters")
        if rope is None:  # transformers-4 style
            rope = dict(layer.get("rope_scaling") or {"rope_type": "default"})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = layer.get("rope_theta", 10000.0)
        aux_ids = d.get("eagle_aux_hidden_state_layer_ids")
        spec = d["speculators_config"]
        verifier = spec.get("verifier", {})
        return cls(
            hidden_size=layer["hidden_size"],
            num_attention_heads=layer["num_attention_heads"],
            num_key_value_heads=layer.get("num_key_value_heads", layer["num_attention_heads"]),
            head_dim=layer.get("head_dim"),
            intermediate_size=layer["intermediate_size"],
            vocab_size=layer["vocab_size"],
            num_hidden_layers=layer["num_hidden_layers"],
            rms_norm_eps=layer.get("rms_norm_eps", 1e-6),
            max_position_embeddings=layer.get("max_position_embeddings", 2048),
            rope_parameters=copy.deepcopy(rope),
            hidden_act=layer.get("hidden_act", "silu"),
            draft_vocab_size=d.get("draft_vocab_size"),
            num_aux_layers=3 if aux_ids is None else len(aux_ids),
            target_hidden_size=d.get("target_hidden_size"),
            mask_token_id=d["mask_token_id"],
            norm_before_residual=d.get("norm_before_residual", False),
            norm_before_fc=d.get("norm_before_fc", False),
            fc_norm=d.get("fc_norm", False),
            norm_output=d.get("norm_output", False),
            aux_layer_ids=None if aux_ids is None else list(aux_ids),
            num_speculative_tokens=spec["proposal_methods"][0]["speculative_tokens"],
            verifier_name_or_path=verifier.get("name_or_path") or "",
            verifier_architectures=list(verifier.get("architectures") or []),
            verifier_fingerprint=d.get("peagle_verifier_fingerprint"),
        )

    @classmethod
    def from_target(cls, target_config: Any, **overrides: Any) -> DraftConfig:
        """Draft config for a HF target config: same widths, heads, vocab, eps and RoPE as the target.

        `mask_token_id` has no default (it depends on the tokenizer: pick an id that never occurs in the
        data) and must be given in `overrides`. Aux layer ids default to (2, L//2, L−3).
        """
        if "mask_token_id" not in overrides:
            raise ValueError("from_target needs mask_token_id=... (an id that never occurs in the data)")
        name_or_path = getattr(target_config, "name_or_path", "") or ""
        architectures = list(getattr(target_config, "architectures", None) or [])
        if hasattr(target_config, "get_text_config"):  # multimodal targets: draft the text model
            target_config = target_config.get_text_config()
        hidden = target_config.hidden_size
        heads = target_config.num_attention_heads
        num_layers = target_config.num_hidden_layers
        rope = getattr(target_config, "rope_parameters", None)
        if rope is None:  # transformers-4 style config object
            rope = dict(getattr(target_config, "rope_scaling", None) or {"rope_type": "default"})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = getattr(target_config, "rope_theta", 10000.0)
        elif "rope_type" not in rope and "full_attention" in rope:  # per-layer-type rope (e.g. gemma3)
            rope = rope["full_attention"]
        rope = {k: v for k, v in copy.deepcopy(dict(rope)).items() if k not in _DROPPED_ROPE_KEYS}
        kwargs: dict[str, Any] = dict(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(target_config, "head_dim", None) or hidden // heads,
            intermediate_size=target_config.intermediate_size,
            vocab_size=target_config.vocab_size,
            rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
            max_position_embeddings=target_config.max_position_embeddings,
            rope_parameters=rope,
            target_hidden_size=hidden,
            aux_layer_ids=list(default_aux_layer_ids(num_layers)),
            verifier_name_or_path=name_or_path,
            verifier_architectures=architectures,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for logging / run configs)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """RMSNorm with HF semantics: normalise in fp32, cast back to the input dtype, then scale. fp32 and
    fp64 inputs (training on CPU) take `_RMSNorm`, the same maths in one autograd node."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            return _RMSNorm.apply(x, self.weight, self.eps)
        dtype = x.dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)


class _RMSNorm(torch.autograd.Function):
    """weight · x · rsqrt(mean(x²) + eps), saving x and the [M, 1] rsqrt only (CPU runs F.rms_norm as
    pow/mean/rsqrt/mul nodes that also keep x², the normalised x and the product: 2 more [M, H]
    tensors per norm, 9 norms per step)."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001, ANN205
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return x * rstd * weight

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        g = dy * weight
        dx = (g - x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(rstd)
        return dx, dw, None


class Rotary(nn.Module):
    """RoPE frequencies from transformers' own init functions (so llama3 / yarn scaling is HF's).

    `inv_freq` is a non-persistent buffer (not in the checkpoint). It is recomputed in fp32 whenever
    the module is moved or cast (`.to(bfloat16)` would otherwise round the frequencies).
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self._compute()
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def _compute(self) -> tuple[torch.Tensor, float]:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        with torch.device("cpu"):  # never on meta: these are values, not parameters
            hf = LlamaRotaryEmbedding(self.config.llama_config())
        return hf.inv_freq.float(), float(hf.attention_scaling)

    def _apply(self, fn: Callable, recurse: bool = True) -> Rotary:
        super()._apply(fn, recurse)
        self.inv_freq = nn.Buffer(self._compute()[0].to(self.inv_freq.device), persistent=False)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [M, head_dim] in fp32 for positions [M]."""
        freqs = position_ids[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [M, heads, hd] by cos/sin [M, hd] (HF rotate-half convention)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def repeat_last(x: torch.Tensor, n: int) -> torch.Tensor:
    """x with its last row standing for n identical rows: [R, ...] -> [R - 1 + n, ...] (n = 0: x)."""
    if n == 0:
        return x
    return torch.cat([x[:-1], x[-1:].expand(n, *x.shape[1:])])


class Attention(nn.Module):
    """q/k/v/o projections + RoPE; the attention pattern itself is the caller's `attention` callable."""

    def __init__(self, config: DraftConfig, in_features: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer_idx: int, attention: AttentionFn,
        shared: int = 0,
    ) -> torch.Tensor:
        """x [M, in] (with `shared`: its last row stands for that many identical rows, projected once)."""
        m = cos.shape[0]
        q = apply_rotary(repeat_last(self.q_proj(x), shared).view(m, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(repeat_last(self.k_proj(x), shared).view(m, self.num_kv_heads, self.head_dim), cos, sin)
        v = repeat_last(self.v_proj(x), shared).view(m, self.num_kv_heads, self.head_dim)
        out = attention(layer_idx, q, k, v)  # [M, Hq, hd]
        return self.o_proj(out.reshape(m, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Llama SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or not torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) saving only x, gate(x) and up(x): the activation and the product
    (two more [M, intermediate] tensors per layer) are recomputed in backward."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):  # noqa: ANN001, ANN205
        g, u = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
        return F.linear(F.silu(g) * u, w_down)

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        x, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        act = F.silu(g)
        da = dy @ w_down
        d_down = dy.reshape(-1, dy.shape[-1]).T @ (act * u).reshape(-1, u.shape[-1]) \
            if ctx.needs_input_grad[3] else None
        du = da * act
        dg = torch.ops.aten.silu_backward(da.mul_(u), g)  # ·silu'(g) in one fused pass (5 passes, not 10)
        dx = dg @ w_gate + du @ w_up
        x2 = x.reshape(-1, x.shape[-1])
        d_gate = dg.reshape(-1, dg.shape[-1]).T @ x2 if ctx.needs_input_grad[1] else None
        d_up = du.reshape(-1, du.shape[-1]).T @ x2 if ctx.needs_input_grad[2] else None
        return dx, d_gate, d_up, d_down


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer. Layer 0 is the fused EAGLE-3 first layer: attention input is
    concat(input_layernorm(embedding), hidden_norm(fc output)) of width 2H; its residual is the raw fc
    output, or hidden_norm(fc output) when `norm_before_residual`. Layer 0 takes `shared`: the last
    input row stands for that many mask slots (identical inputs), so their norms and q/k/v projections
    run once (the rotary embedding and attention then differ per slot)."""

    def __init__(self, config: DraftConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.first = layer_idx == 0
        self.norm_before_residual = config.norm_before_residual
        h, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        if self.first:
            self.hidden_norm = RMSNorm(h, eps)
        self.self_attn = Attention(config, 2 * h if self.first else h)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
        shared: int = 0,
    ) -> torch.Tensor:
        if self.first:
            hidden = self.hidden_norm(x)
            residual = repeat_last(hidden if self.norm_before_residual else x, shared)
            attn_in = torch.cat([self.input_layernorm(emb), hidden], dim=-1)
        else:
            residual, attn_in = x, self.input_layernorm(x)
        x = residual + self.self_attn(attn_in, cos, sin, self.layer_idx, attention, shared)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------
# The draft


class PEagleDraft(nn.Module):
    """P-EAGLE draft head. Parameter and buffer names are the speculators checkpoint keys."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        h, ht, fc_in = config.hidden_size, config.target_hidden_size, config.fc_in_features
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        if config.norm_before_fc:
            self.input_norm = RMSNorm(fc_in, config.rms_norm_eps)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(
                RMSNorm(ht, config.rms_norm_eps) for _ in range(config.num_aux_layers)
            )
        self.fc = nn.Linear(fc_in, h, bias=False)
        self.mask_hidden = nn.Parameter(torch.randn(1, 1, fc_in))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        # Vocabulary mapping, identity by default: draft id i ↔ target id i + d2t[i]; t2d marks draft tokens.
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.d2t = nn.Buffer(torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.t2d = nn.Buffer(t2d)
        self.rotary_emb = Rotary(config)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """HF Llama init: Linear/Embedding ~ N(0, 0.02), norms 1; mask_hidden ~ N(0, 1) (speculators)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    # -- inputs ------------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (trainable, saved: the mask token's row is learned)."""
        return self.embed_tokens(ids)

    def project_aux(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., num_aux·Ht] → [..., H]: the optional pre-fc norm(s), then fc."""
        if self.config.norm_before_fc:
            aux = self.input_norm(aux)
        elif self.config.fc_norm:
            chunks = aux.chunk(self.config.num_aux_layers, dim=-1)
            aux = torch.cat([norm(c) for norm, c in zip(self.fc_norm, chunks, strict=True)], dim=-1)
        return self.fc(aux)

    def projected_mask_hidden(self) -> torch.Tensor:
        """The hidden row of every mask slot, [H]: mask_hidden through the same norm/fc as real aux."""
        return self.project_aux(self.mask_hidden).reshape(-1)

    def mask_slots(self, n: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The input of n mask slots: (ids [n] = mask_token_id, hidden [n, H] = projected mask_hidden).

        This is what vLLM's parallel drafting feeds every draft slot past the bonus token (depth >= 1),
        whatever the anchor: training (COD depth >= 1 elements), evaluation and the literal loop build
        their mask slots here. ``hidden`` is an expanded view of one row (gradients reach mask_hidden
        and fc); ``dtype`` casts that row (default: as `projected_mask_hidden` returns it). Positions
        are the caller's (position of the anchor + depth).
        """
        row = self.projected_mask_hidden()
        if dtype is not None:
            row = row.to(dtype)
        ids = torch.full((n,), self.config.mask_token_id, dtype=torch.long, device=row.device)
        return ids, row.reshape(1, -1).expand(n, -1)

    # -- forward -----------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention: AttentionFn,
        num_mask_slots: int = 0,
    ) -> torch.Tensor:
        """Run all layers over M flat elements; returns h [M, H] before the final norm.

        input_ids [M - num_mask_slots] (mask_token_id at mask slots given here), hidden [M - num_mask_slots, H]
        already projected (project_aux rows for real slots, projected_mask_hidden() for mask slots),
        position_ids [M] (= anchor + depth), attention(layer_idx, q [M, Hq, hd], k [M, Hkv, hd], v) ->
        [M, Hq, hd]. ``num_mask_slots``: that many mask slots follow the given rows; the draft builds
        their input (`mask_slots`) once for all of them (training's COD depths >= 1: ~60 % of the rows).
        """
        if num_mask_slots:
            slot_ids, slot_hidden = self.mask_slots(1)
            if hidden.shape[0]:  # without given rows the slot row keeps its own dtype (autocast's)
                slot_ids = torch.cat([input_ids, slot_ids])
                slot_hidden = torch.cat([hidden, slot_hidden.to(hidden.dtype)])
            input_ids, hidden = slot_ids, slot_hidden
        emb = self.embed(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = hidden
        for layer in self.layers:
            e, shared = (emb, num_mask_slots) if layer.first else (None, 0)
            if use_ckpt:
                x = checkpoint(layer, x, e, cos, sin, attention, shared, use_reentrant=False)
            else:
                x = layer(x, e, cos, sin, attention, shared)
        return x

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm (what the chunked loss multiplies by lm_head.weight)."""
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits lm_head(norm(h)) (evaluation; training uses the chunked loss)."""
        return self.lm_head(self.norm(h))

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocab ids to target ids (target = draft + d2t[draft], as vLLM does)."""
        return draft_ids + self.d2t[draft_ids]

    # -- initialisation from the target and vocabulary ---------------------------------------------

    @torch.no_grad()
    def set_vocab_mapping(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        """Install the draft vocabulary (d2t offsets [Vd], t2d bool [V]); checks they describe the same
        ascending id list (draft id i ↔ i-th True position of t2d)."""
        vd, v = self.config.draft_vocab_size, self.config.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,):
            raise ValueError(
                f"expected d2t [{vd}] and t2d [{v}], got {tuple(d2t.shape)} and {tuple(t2d.shape)}"
            )
        if t2d.dtype != torch.bool:
            raise ValueError(f"t2d must be bool, got {t2d.dtype}")
        d2t = d2t.to(device=self.d2t.device, dtype=torch.long)
        t2d = t2d.to(self.t2d.device)
        target_ids = torch.arange(vd, device=d2t.device) + d2t
        if not torch.equal(target_ids, t2d.nonzero().squeeze(1)):
            raise ValueError(
                "d2t and t2d disagree: arange(Vd) + d2t must equal the sorted True positions of t2d"
            )
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    @torch.no_grad()
    def init_lm_head_from_target(
        self, target_lm_head_weight: torch.Tensor, t2d: torch.Tensor | None = None
    ) -> None:
        """Copy the target lm_head rows of the draft vocabulary (target [V, Ht], rows where t2d)."""
        t2d = self.t2d if t2d is None else t2d
        rows = target_lm_head_weight[t2d.to(target_lm_head_weight.device)]
        if rows.shape != self.lm_head.weight.shape:
            raise ValueError(
                f"target lm_head rows {tuple(rows.shape)} do not fit the draft lm_head "
                f"{tuple(self.lm_head.weight.shape)} (draft vocab and hidden size must match)"
            )
        self.lm_head.weight.copy_(rows)

    @torch.no_grad()
    def init_embed_tokens_from_target(self, target_embed_weight: torch.Tensor) -> None:
        """Start embed_tokens from the target's input embedding [V, H] (it stays trainable)."""
        if target_embed_weight.shape != self.embed_tokens.weight.shape:
            raise ValueError(
                f"target embedding {tuple(target_embed_weight.shape)} does not fit "
                f"{tuple(self.embed_tokens.weight.shape)}"
            )
        self.embed_tokens.weight.copy_(target_embed_weight)

    def freeze_lm_head(self) -> None:
        """Keep lm_head fixed (speculators' choice: a copy of the target rows)."""
        self.lm_head.weight.requires_grad_(False)

    # -- checkpoint I/O ----------------------------------------------------------------------------

    def _omitted_keys(self) -> tuple[str, ...]:
        """Keys a full-vocabulary checkpoint leaves out: vLLM creates its ``draft_id_to_target_id`` only
        for a reduced draft vocabulary and refuses a file that carries ``d2t`` otherwise."""
        return ("d2t", "t2d") if self.config.draft_vocab_size == self.config.vocab_size else ()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors (speculators format) atomically.

        Written through `fsutil.atomic_dir` (a temporary directory beside `directory` renamed into
        place), so a reader never sees a half-written checkpoint.
        """
        directory = Path(directory)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()
                 if k not in self._omitted_keys()}
        dtype = str(self.fc.weight.dtype).removeprefix("torch.")
        with atomic_dir(directory, replace=True, fsync=True) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            with open(tmp / CONFIG_NAME, "w") as f:
                json.dump(self.config.to_speculators_config(dtype=dtype), f, indent=2, sort_keys=True)
                f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> PEagleDraft:
        """Load a checkpoint written by `save_pretrained` (or by speculators) bit-exactly.

        Tensors keep their stored dtype. Raises FileNotFoundError / ValueError naming the file and key
        when config.json or model.safetensors is missing, the config is not P-EAGLE, or a tensor is
        missing, unexpected, or has the wrong shape.
        """
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (expected a speculators P-EAGLE checkpoint)")
        with open(config_path) as f:
            raw = json.load(f)
        if raw.get("speculators_model_type") != "peagle":
            raise ValueError(
                f"{config_path}: speculators_model_type is {raw.get('speculators_model_type')!r}, "
                "expected 'peagle'"
            )
        config = DraftConfig.from_speculators_config(raw)
        with torch.device("meta"):
            model = cls(config)
        with safe_open(str(weights_path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        omitted = [k for k in model._omitted_keys() if k not in state]  # (older exports carry them)
        expected = {k: v for k, v in model.state_dict().items() if k not in omitted}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing keys {missing}, unexpected keys {unexpected}")
        for key, ref in expected.items():
            got = state[key]
            if got.shape != ref.shape:
                raise ValueError(
                    f"{weights_path}: {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
                )
            if got.is_floating_point() != ref.is_floating_point() or (
                not ref.is_floating_point() and got.dtype != ref.dtype
            ):
                raise ValueError(f"{weights_path}: {key} has dtype {got.dtype}, expected {ref.dtype}")
        model.load_state_dict(state, strict=not omitted, assign=True)
        if omitted:  # identity vocabulary mapping: rebuild the buffers off meta
            model.d2t = nn.Buffer(torch.zeros(config.draft_vocab_size, dtype=torch.long, device=device))
            model.t2d = nn.Buffer(torch.ones(config.vocab_size, dtype=torch.bool, device=device))
        model.rotary_emb.to(device)  # recomputes inv_freq (it was built on meta)
        return model


__all__ = [
    "DraftConfig",
    "PEagleDraft",
    "RMSNorm",
    "Rotary",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]
