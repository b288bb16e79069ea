"""The draft's building blocks: RMSNorm, RoPE, attention projections, SwiGLU MLP, decoder layers.

Layer 0 is the fused EAGLE-3 first layer (q/k/v from the concatenation of the normed token embedding
and the normed projected hidden state); layers 1..N-1 are plain pre-norm Llama layers. Attention
itself is not computed here: each layer computes q, k, v (RoPE applied) and calls the
``attention(layer_idx, q, k, v)`` callable it is given (the COD mask lives in `peagle.model.mask`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from peagle.model.config import DraftConfig

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]



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
