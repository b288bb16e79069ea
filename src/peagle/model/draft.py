"""The P-EAGLE draft model (`PEagleDraft`) and its speculators-format checkpoint (save / load).

Its configuration and config.json are `peagle.model.config`; its layers `peagle.model.layers`.
Parameter and buffer names are exactly the checkpoint keys vLLM and speculators load (no ``model.``
prefix).

Data flow of one draft forward over M flat elements (docs/conventions.md):

    hidden[M, H]  = fc(norm?(aux[M, 3·Ht]))  for real slots,  fc(norm?(mask_hidden))  for mask slots
    emb[M, H]     = embed_tokens(input_ids)
    layer 0       : residual = hidden (or hidden_norm(hidden) if norm_before_residual)
                    x = residual + attn(concat(input_layernorm(emb), hidden_norm(hidden)))   # q/k/v from 2H
                    x = x + mlp(post_attention_layernorm(x))
    layers 1..N-1 : plain pre-norm Llama layers
    logits        = lm_head(norm(x))  over the draft vocabulary (draft id i ↔ target id i + d2t[i])

Attention itself is not computed here: each layer calls the `attention(layer_idx, q, k, v)` callable
given to `forward` (the COD mask and its kernels live in `peagle.model.mask` / `.tiled_attention`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from peagle.model.config import CONFIG_NAME, WEIGHTS_NAME, DraftConfig, check_peagle_config
from peagle.model.layers import AttentionFn, DecoderLayer, RMSNorm, Rotary
from peagle.util.files import atomic_dir


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

        Written through `peagle.util.files.atomic_dir` (a temporary directory beside `directory` renamed into
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
        check_peagle_config(raw, str(config_path))
        config = DraftConfig.from_speculators_config(raw)
        with safe_open(str(weights_path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_state_dict(config, state, device=device, source=str(weights_path))

    @classmethod
    def from_state_dict(cls, config: DraftConfig, state: dict[str, torch.Tensor],
                        device: str | torch.device = "cpu", source: str = "state dict") -> PEagleDraft:
        """A draft holding exactly ``state``'s tensors (no copy, no initialisation: built on meta).

        The one loader of whole drafts: `from_pretrained` and the copy gathered from FSDP shards
        (`peagle.run.distributed.full_draft`) both come here, so both save the same bytes. ``d2t``/``t2d``
        may be absent for a full vocabulary (`_omitted_keys`); any other missing, unexpected or
        misshapen tensor is a ValueError naming ``source``.
        """
        with torch.device("meta"):
            model = cls(config)
        omitted = [k for k in model._omitted_keys() if k not in state]  # (older exports carry them)
        expected = {k: v for k, v in model.state_dict().items() if k not in omitted}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source}: missing keys {missing}, unexpected keys {unexpected}")
        for key, ref in expected.items():
            got = state[key]
            if got.shape != ref.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            if got.is_floating_point() != ref.is_floating_point() or (
                not ref.is_floating_point() and got.dtype != ref.dtype
            ):
                raise ValueError(f"{source}: {key} has dtype {got.dtype}, expected {ref.dtype}")
        model.load_state_dict(state, strict=not omitted, assign=True)
        if omitted:  # identity vocabulary mapping: rebuild the buffers off meta
            model.d2t = nn.Buffer(torch.zeros(config.draft_vocab_size, dtype=torch.long, device=device))
            model.t2d = nn.Buffer(torch.ones(config.vocab_size, dtype=torch.bool, device=device))
        model.rotary_emb.to(device)  # recomputes inv_freq (it was built on meta)
        return model
