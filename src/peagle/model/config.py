"""The draft's configuration and its speculators-format ``config.json`` (the contract with vLLM).

`DraftConfig` holds Hugging Face field names (they go into ``transformer_layer_config``) plus the P-EAGLE
fields; `to_speculators_config` / `from_speculators_config` are the checkpoint's config.json both ways
(the structure speculators 0.9.0 writes, which vLLM reads), and `from_target` sizes a draft like its
target. The aux-layer convention (which target layers feed the draft) lives here because the checkpoint
records it (``eagle_aux_hidden_state_layer_ids``) and vLLM follows it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import transformers

from peagle.config.limits import validate_mask_token_id

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


def legacy_rope_parameters(rope_scaling: Mapping[str, Any] | None, rope_theta: float) -> dict[str, Any]:
    """transformers-4 style ``rope_scaling`` + ``rope_theta`` as one transformers-5 ``rope_parameters``
    dict (checkpoints and target configs written before the rename carry the old pair)."""
    rope = dict(rope_scaling or {"rope_type": "default"})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = rope_theta
    return rope


def check_peagle_config(raw: Mapping[str, Any], where: str = "config") -> None:
    """ValueError unless ``raw`` (a parsed config.json) is a speculators P-EAGLE config: the one check of
    ``speculators_model_type`` (the draft loader, the export and `from_speculators_config` ask it)."""
    if not is_peagle_config(raw):
        got = raw.get("speculators_model_type") if isinstance(raw, Mapping) else None
        raise ValueError(f"{where}: speculators_model_type is {got!r}, expected 'peagle' (not a P-EAGLE draft)")


def is_peagle_config(raw: object) -> bool:
    """Whether a parsed config.json is a speculators P-EAGLE draft's."""
    return isinstance(raw, Mapping) and raw.get("speculators_model_type") == "peagle"


def default_aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """(2, L//2, L−3) as vLLM and speculators choose them, when those are distinct and inside the target;
    else (1, L//2, L−1) (L ≥ 4) or (0, 1, 2) (L = 2, 3): vLLM collapses repeated ids, so they must differ."""
    if num_layers < 2:
        raise ValueError(f"a target with {num_layers} layer(s) has no three distinct aux layers (ids 0..{num_layers})")
    for ids in ((2, num_layers // 2, num_layers - 3), (1, num_layers // 2, num_layers - 1), (0, 1, 2)):
        if len(set(ids)) == 3 and all(0 <= i <= num_layers for i in ids):
            return tuple(sorted(ids))  # type: ignore[return-value]
    raise AssertionError("unreachable: (0, 1, 2) fits every target with >= 2 layers")


def resolve_aux_layer_ids(ids: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """The aux layer ids a draft uses with a target of ``num_layers`` layers, in increasing order.

    ``None`` gives `default_aux_layer_ids`. Ids must be distinct and within 0..L (id L = the input of
    the final norm); they are sorted because vLLM always feeds the aux states in increasing layer
    order, whatever order a config lists (docs/conventions.md, "Aux layers").
    """
    if ids is None:
        return default_aux_layer_ids(num_layers)
    out = tuple(int(i) for i in ids)
    if any(not 0 <= i <= num_layers for i in out):
        raise ValueError(f"aux_layer_ids {list(out)} out of range for a target with {num_layers} layers "
                          f"(0..{num_layers})")
    if len(set(out)) != len(out):
        raise ValueError(f"aux_layer_ids {list(out)} repeat a layer: vLLM collapses repeated ids and then "
                          "feeds the draft fewer aux states than it was trained on; use distinct ids")
    return tuple(sorted(out))


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
    # what identifies the target the draft was trained for (peagle.target.hf.verifier_fingerprint); checked
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
        check_peagle_config(d)
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
        if rope is None:
            rope = legacy_rope_parameters(layer.get("rope_scaling"), layer.get("rope_theta", 10000.0))
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
        if rope is None:
            rope = legacy_rope_parameters(getattr(target_config, "rope_scaling", None),
                                          getattr(target_config, "rope_theta", 10000.0))
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
