"""The frozen target: a Hugging Face causal LM that yields aux states and final hidden states.

Aux states (docs/conventions.md) are the residual stream ENTERING decoder layers ``aux_layer_ids``
(in increasing order; default (2, L//2, L−3) when distinct), captured with forward pre-hooks on
those layers; id L means the input of the final norm. The final hidden state is the input of the
final norm (pre-norm); the trainer's ``TargetHead`` applies norm + lm_head rows of the draft vocab.
Packed rows run with per-document attention (block-diagonal causal) and positions restarting per
document, so a document's states equal those of the document run alone.
`Target` and `TargetParts` (the cache path's lm_head/norm/embeddings only) read the same checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peagle.model.config import resolve_aux_layer_ids


class TargetError(ValueError):
    """The target path cannot be used (not a causal LM, missing files, unsupported layout)."""




def _aux_layer_ids(ids: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """`resolve_aux_layer_ids` for this target: a bad id is a TargetError (the target cannot be used so)."""
    try:
        return resolve_aux_layer_ids(ids, num_layers)
    except ValueError as e:
        raise TargetError(str(e)) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _describe(path: Path) -> str:
    """What the path holds, for error messages."""
    if not path.exists():
        return "no such path"
    if not path.is_dir():
        return "a file, not a model directory"
    cfg = path / "config.json"
    if not cfg.exists():
        names = sorted(p.name for p in path.iterdir())[:8]
        return f"no config.json (found: {', '.join(names) or 'empty directory'})"
    try:
        c = json.loads(cfg.read_text())
        return f"model_type={c.get('model_type')!r}, architectures={c.get('architectures')}"
    except (OSError, json.JSONDecodeError):
        return "an unreadable config.json"


def target_shape(path: str | Path, trust_remote_code: bool = False) -> tuple[int, int]:
    """(vocab size, decoder layers) of a target from its ``config.json`` alone (no weights loaded).

    The one reader of a target's shape (text config of multimodal targets). Raises TargetError with
    one line naming ``path`` when it is not a Hugging Face model directory or not a decoder LM.
    """
    from transformers import AutoConfig

    p = Path(path)
    try:
        cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise TargetError(f"target {path} is not a Hugging Face model directory ({_describe(p)}): "
                          f"{_first_line(e)}") from None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab, layers = getattr(cfg, "vocab_size", None), getattr(cfg, "num_hidden_layers", None)
    if not vocab or not layers:
        raise TargetError(f"target {path} is not a decoder LM ({_describe(p)}): its config has no "
                          "vocab_size / num_hidden_layers")
    return int(vocab), int(layers)


def embedding_rows(path: str | Path, trust_remote_code: bool = False) -> int | None:
    """The target's embedding rows (`target_shape`) when ``path`` holds a decoder LM's config.json; None
    for a tokenizer-only directory. What ``prepare`` checks token and mask ids against: a model may
    have more rows than its tokenizer has tokens."""
    if not (Path(path) / "config.json").is_file():
        return None
    try:
        return target_shape(path, trust_remote_code)[0]
    except TargetError:
        return None


def block_causal_mask(document_ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """[B, 1, n, n] mask: q sees k iff same document and k ≤ q; padding (−1) sees only itself.

    bool (True = attend) when ``dtype`` is None (sdpa), else additive 0 / finfo.min (eager).
    Padding attends to itself so no row is fully masked (which would give NaN).
    """
    B, n = document_ids.shape
    idx = torch.arange(n, device=document_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    real = (document_ids >= 0)[:, :, None]
    allowed = (same & causal[None] & real) | torch.eye(n, dtype=torch.bool, device=document_ids.device)[None]
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=document_ids.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=document_ids.device)
    return torch.where(allowed, zero, neg)


class Target:
    """Frozen HF causal LM with hooks for aux/final hidden states (see module docstring).

    A plain object, not an ``nn.Module``, so its weights never end up in a parent's parameters or
    state dict by accident.

    ``dtype`` default: bf16 on CUDA, fp32 on CPU. ``attn_implementation`` "sdpa" or "eager" use an
    explicit block-diagonal 4-D mask; other implementations (flash/flex) get ``attention_mask=None``
    and rely on HF's packed-sequence detection from restarting ``position_ids``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        aux_layer_ids: Sequence[int] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = Path(path)
        if not self.path.exists():  # a local path only: never wait on hub retries for a typo
            raise TargetError(f"target {path}: no such path (expected a local Hugging Face model directory)")
        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:
            msg = _first_line(e)
            raise TargetError(f"target {path} is not a Hugging Face model directory "
                              f"({_describe(self.path)}): {msg}") from None
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation,
            )
        except (ValueError, KeyError) as e:
            msg = _first_line(e)
            raise TargetError(f"target {path} is not a causal LM ({_describe(self.path)}): {msg}") from None
        except OSError as e:
            msg = _first_line(e)
            raise TargetError(f"cannot load target weights from {path} ({_describe(self.path)}): {msg}") \
                from None
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        self.model = model
        self.hf_config = model.config  # the whole config (architectures, name_or_path); `config`: the text part
        self.config = getattr(config, "text_config", None) or config
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        norm = getattr(decoder, "norm", None)
        if not isinstance(layers, nn.ModuleList) or norm is None:
            raise TargetError(f"target {path}: cannot find decoder layers and final norm "
                              f"(expected model.model.layers / model.model.norm; {_describe(self.path)})")
        self.decoder = decoder
        self.layers = layers
        self.final_norm = norm
        self.lm_head = model.get_output_embeddings()
        self.num_layers = len(layers)
        L = self.num_layers
        self.aux_layer_ids = _aux_layer_ids(aux_layer_ids, L)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.dtype = dtype
        self.device = device
        self.attn_implementation = getattr(model.config, "_attn_implementation", attn_implementation)
        self._captured: dict[int, Tensor] = {}
        self._hooks = []
        for i in self.aux_layer_ids:
            module = norm if i == L else layers[i]
            self._hooks.append(module.register_forward_pre_hook(self._make_hook(i), with_kwargs=True))
        if L not in self.aux_layer_ids:
            self._hooks.append(norm.register_forward_pre_hook(self._make_hook(L), with_kwargs=True))

    def _make_hook(self, key: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._captured[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    @torch.no_grad()
    def hidden_states(
        self,
        input_ids: Tensor,
        document_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        use_position_packing: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Aux states [B, n, 3H] (concatenated in ``aux_layer_ids`` order) and final pre-norm
        hidden states [B, n, H] for packed rows (unshifted tokens).

        ``document_ids`` [B, n]: −1 = padding; default one document per row. ``position_ids``
        default: position within the document. Values at padding positions are unspecified.
        """
        from peagle.data.packing import positions_in_document

        squeeze = input_ids.dim() == 1
        if squeeze:
            input_ids = input_ids[None]
            document_ids = None if document_ids is None else document_ids[None]
            position_ids = None if position_ids is None else position_ids[None]
        input_ids = input_ids.to(self.device)
        if document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        document_ids = document_ids.to(self.device)
        if position_ids is None:
            position_ids = positions_in_document(document_ids)
        position_ids = position_ids.to(self.device)
        if use_position_packing is None:
            use_position_packing = self.attn_implementation not in ("sdpa", "eager")
        if use_position_packing:
            mask = None
        elif self.attn_implementation == "eager":
            mask = block_causal_mask(document_ids, self.dtype)
        else:
            mask = block_causal_mask(document_ids)
        self._captured = {}
        try:
            # The decoder only (no lm_head): full-vocabulary logits are never materialised.
            self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
            aux = torch.cat([self._captured[i] for i in self.aux_layer_ids], dim=-1)
            final = self._captured[self.num_layers]
        finally:
            self._captured = {}
        if squeeze:
            aux, final = aux[0], final[0]
        return aux, final

    def states(self, packed: Any) -> tuple[Tensor, Tensor]:
        """``hidden_states`` for a ``peagle.data.PackedRows`` (the interface shared with the cache)."""
        return self.hidden_states(packed.input_ids, packed.document_ids, packed.position_ids)

    @property
    def norm_eps(self) -> float:
        eps = getattr(self.final_norm, "variance_epsilon", None) or getattr(self.final_norm, "eps", None)
        return float(eps if eps is not None else getattr(self.config, "rms_norm_eps", 1e-6))

    @torch.no_grad()
    def logits_from_final(self, final: Tensor, t2d: Tensor | None = None) -> Tensor:
        """Target logits from final pre-norm hidden states, restricted to the t2d rows (all if None)."""
        w = self.lm_head.weight
        if t2d is not None:
            w = w[t2d.to(w.device)]
        h = self.final_norm(final.to(w.device, w.dtype))
        out = h @ w.T
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            out = out + (bias[t2d.to(bias.device)] if t2d is not None else bias)
        return out

    def head(self, t2d: Tensor | None = None) -> Any:
        """The trainer's frozen ``peagle.model.loss.TargetHead``: final norm + lm_head rows of the draft vocab."""
        from peagle.model.loss import TargetHead

        w = self.lm_head.weight.detach()
        return TargetHead.from_weights(self.final_norm.weight.detach(), self.norm_eps, w,
                                       None if t2d is None else t2d.to(w.device))

    @property
    def embed_weight(self) -> Tensor:
        """The input embedding matrix [V, Ht] (a draft may start from it)."""
        return self.model.get_input_embeddings().weight.detach()

    @property
    def lm_head_weight(self) -> Tensor:
        return self.lm_head.weight.detach()

    @property
    def final_norm_weight(self) -> Tensor:
        return self.final_norm.weight.detach()


class TargetParts:
    """What training from a state cache needs of the target, read straight from its safetensors files:
    config, input embeddings, final norm and lm_head — never the decoder layers.

    A 70B target's cache trains with a few GB of target weights on each rank instead of the whole model.
    Same interface as `Target` for the trainer (hf_config, config, aux_layer_ids, vocab_size, hidden_size,
    embed_weight, lm_head_weight, head); it cannot compute states (use the cache).
    """

    def __init__(self, path: str | Path, *, aux_layer_ids: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_dir():
            raise TargetError(f"target {path}: {_describe(self.path)} (expected a local Hugging Face model directory)")
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:
            raise TargetError(f"target {path} is not a Hugging Face model directory: {_first_line(e)}") from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.hf_config, self.config = config, text
        files = _weight_files(self.path)
        names = {k: f for f, keys in files.items() for k in keys}
        embed = min((k for k in names if k.endswith("embed_tokens.weight")), key=len, default=None)
        if embed is None:
            raise TargetError(f"target {path}: no '*embed_tokens.weight' tensor in its safetensors files")
        prefix = embed[: -len("embed_tokens.weight")]
        norm = prefix + "norm.weight"
        head = min((k for k in names if k.endswith("lm_head.weight")), key=len, default=None)
        if norm not in names:
            raise TargetError(f"target {path}: no final norm tensor {norm!r} beside {embed!r}")
        if head is None and not getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
            raise TargetError(f"target {path}: no lm_head.weight and tie_word_embeddings is false")

        def read(key: str) -> Tensor:
            with safe_open(str(names[key]), framework="pt") as f:
                return f.get_tensor(key).to(dtype)

        self._embed = read(embed)
        self._norm = read(norm)
        self._head = read(head) if head is not None else self._embed
        self.num_layers = int(text.num_hidden_layers)
        self.aux_layer_ids = _aux_layer_ids(aux_layer_ids, self.num_layers)
        self.hidden_size = int(text.hidden_size)
        self.vocab_size = int(self._head.shape[0])
        self.norm_eps = float(getattr(text, "rms_norm_eps", 1e-6))
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def embed_weight(self) -> Tensor:
        return self._embed

    @property
    def lm_head_weight(self) -> Tensor:
        return self._head

    @property
    def final_norm_weight(self) -> Tensor:
        return self._norm

    def head(self, t2d: Tensor | None = None) -> Any:
        """The frozen ``peagle.model.loss.TargetHead`` (final norm + lm_head rows of the draft vocab)."""
        from peagle.model.loss import TargetHead

        return TargetHead.from_weights(self._norm, self.norm_eps, self._head, t2d)


def verifier_fingerprint(target: Any, tokenizer: Any) -> dict[str, Any]:
    """What a draft records of the target it is trained for, so `peagle eval` can refuse another one:
    the shape (model type, layers, hidden size, vocabulary), the tokenizer's vocabulary digest, and a digest
    of the final norm's weights (cheap to read, and different between fine-tunes of one base model)."""
    import hashlib

    from peagle.data.prepared import tokenizer_fingerprint

    # rounded to bf16 first: a target loaded in bf16 (training on GPU) and in fp32 (eval on CPU) agree
    norm = target.final_norm_weight.detach().to(device="cpu", dtype=torch.bfloat16).float().contiguous()
    return {
        "model_type": str(getattr(target.config, "model_type", "")),
        "num_hidden_layers": int(target.config.num_hidden_layers),
        "hidden_size": int(target.hidden_size),
        "vocab_size": int(target.vocab_size),
        "tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer)["vocab_sha256"],
        "final_norm_sha256": hashlib.sha256(norm.numpy().tobytes()).hexdigest(),
    }


def _weight_files(path: Path) -> dict[Path, list[str]]:
    """{safetensors file: its tensor names} of a HF model directory (sharded or not)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [path / s for s in shards]
    else:
        paths = sorted(path.glob("*.safetensors"))
    if not paths:
        raise TargetError(f"target {path}: no *.safetensors weights ({_describe(path)})")
    out = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            out[p] = list(f.keys())
    return out
