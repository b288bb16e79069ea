"""peagle.model.draft: checkpoint layout (keys, shapes, config) and the maths vs a hand-written reference."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from peagle.model.config import DraftConfig
from peagle.model.draft import PEagleDraft

# What speculators 0.9.0 writes for a 2-layer draft of a hidden-64 / vocab-512 target, draft vocab 256
# (copied from shared/reference/speculators-peagle-keys.example.txt).
EXPECTED_TENSORS = {
    "d2t": ((256,), torch.int64),
    "embed_tokens.weight": ((512, 64), torch.float32),
    "fc.weight": ((64, 192), torch.float32),
    "layers.0.hidden_norm.weight": ((64,), torch.float32),
    "layers.0.input_layernorm.weight": ((64,), torch.float32),
    "layers.0.mlp.down_proj.weight": ((64, 128), torch.float32),
    "layers.0.mlp.gate_proj.weight": ((128, 64), torch.float32),
    "layers.0.mlp.up_proj.weight": ((128, 64), torch.float32),
    "layers.0.post_attention_layernorm.weight": ((64,), torch.float32),
    "layers.0.self_attn.k_proj.weight": ((32, 128), torch.float32),
    "layers.0.self_attn.o_proj.weight": ((64, 64), torch.float32),
    "layers.0.self_attn.q_proj.weight": ((64, 128), torch.float32),
    "layers.0.self_attn.v_proj.weight": ((32, 128), torch.float32),
    "layers.1.input_layernorm.weight": ((64,), torch.float32),
    "layers.1.mlp.down_proj.weight": ((64, 128), torch.float32),
    "layers.1.mlp.gate_proj.weight": ((128, 64), torch.float32),
    "layers.1.mlp.up_proj.weight": ((128, 64), torch.float32),
    "layers.1.post_attention_layernorm.weight": ((64,), torch.float32),
    "layers.1.self_attn.k_proj.weight": ((32, 64), torch.float32),
    "layers.1.self_attn.o_proj.weight": ((64, 64), torch.float32),
    "layers.1.self_attn.q_proj.weight": ((64, 64), torch.float32),
    "layers.1.self_attn.v_proj.weight": ((32, 64), torch.float32),
    "lm_head.weight": ((256, 64), torch.float32),
    "mask_hidden": ((1, 1, 192), torch.float32),
    "norm.weight": ((64,), torch.float32),
    "t2d": ((512,), torch.bool),
}

# The companion config.json (shared/reference/speculators-peagle-config.example.json).
EXAMPLE_CONFIG = {
    "architectures": ["PEagleDraftModel"],
    "auto_map": {"": "config.PEagleSpeculatorConfig"},
    "draft_vocab_size": 256,
    "dtype": "float32",
    "eagle_aux_hidden_state_layer_ids": [2, 4, 5],
    "embed_requires_grad": True,
    "fc_norm": False,
    "mask_token_id": 511,
    "norm_before_fc": False,
    "norm_before_residual": False,
    "norm_output": False,
    "speculators_config": {
        "algorithm": "peagle",
        "default_proposal_method": "greedy",
        "proposal_methods": [
            {
                "accept_tolerance": 0.0,
                "proposal_type": "greedy",
                "speculative_tokens": 4,
                "verifier_accept_k": 1,
            }
        ],
        "verifier": {"architectures": ["LlamaForCausalLM"], "name_or_path": "PATH/OR/HUB-ID/OF/THE/TARGET"},
    },
    "speculators_model_type": "peagle",
    "speculators_version": "0.9.0",
    "target_hidden_size": None,
    "tie_word_embeddings": False,
    "transformer_layer_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": 2048,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 512,
    },
    "transformers_version": "5.18.0",
}


def example_config(**overrides):
    kwargs = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=512,
        draft_vocab_size=256,
        mask_token_id=511,
        max_position_embeddings=2048,
        aux_layer_ids=[2, 4, 5],
        num_speculative_tokens=4,
        verifier_name_or_path="PATH/OR/HUB-ID/OF/THE/TARGET",
        verifier_architectures=["LlamaForCausalLM"],
    )
    kwargs.update(overrides)
    return DraftConfig(**kwargs)


def small_config(**overrides):
    kwargs = dict(
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_hidden_layers=3,
        vocab_size=40,
        draft_vocab_size=24,
        mask_token_id=39,
    )
    kwargs.update(overrides)
    return DraftConfig(**kwargs)


def randomize(model, seed=0):
    """Every parameter random (norms too), so tests see each weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.2) + (p.ndim == 1))
    return model


def dense_attention(mask):
    """Reference attention callable: SDPA with a boolean [M, M] mask, GQA by repeating kv heads."""

    def attention(layer_idx, q, k, v):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
        )
        return out.transpose(0, 1)

    return attention


def causal(m):
    return dense_attention(torch.ones(m, m, dtype=torch.bool).tril())


def inputs(config, m=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (m,), generator=g)
    aux = torch.randn(m, config.fc_in_features, generator=g)
    pos = torch.arange(m) + 3
    return ids, aux, pos


# ----------------------------------------------------------------------------------------------------
# Checkpoint layout


def test_state_dict_matches_speculators_keys_shapes_dtypes():
    model = PEagleDraft(example_config())
    got = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    assert got == EXPECTED_TENSORS


def test_config_json_matches_speculators_example():
    cfg = example_config().to_speculators_config()
    expected = json.loads(json.dumps(EXAMPLE_CONFIG))
    # Informational / intentionally different: our transformers version, and no sliding window value
    # (layers are full attention and use_sliding_window is false, so vLLM ignores it).
    assert cfg["transformers_version"] == transformers.__version__
    assert cfg["transformer_layer_config"]["sliding_window"] is None
    for d in (cfg, expected):
        d.pop("transformers_version")
        d["transformer_layer_config"].pop("sliding_window")
    assert json.loads(json.dumps(cfg)) == expected


def test_config_round_trips():
    variants = [
        example_config(),
        small_config(),
        small_config(
            norm_before_residual=True,
            norm_before_fc=True,
            norm_output=True,
            target_hidden_size=16,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
            },
            max_position_embeddings=8192,
            num_speculative_tokens=7,
            rms_norm_eps=1e-5,
        ),
        small_config(fc_norm=True, num_aux_layers=2, aux_layer_ids=[1, 5], draft_vocab_size=None),
    ]
    for config in variants:
        d = json.loads(json.dumps(config.to_speculators_config()))
        assert set(d) == set(EXAMPLE_CONFIG)
        assert set(d["transformer_layer_config"]) == set(EXAMPLE_CONFIG["transformer_layer_config"])
        assert DraftConfig.from_speculators_config(d) == config
    assert variants[2].to_speculators_config()["target_hidden_size"] == 16


def test_config_validation():
    with pytest.raises(ValueError, match="mask_token_id"):
        small_config(mask_token_id=40)
    with pytest.raises(ValueError, match="mask_token_id"):
        small_config(mask_token_id=-1)
    with pytest.raises(ValueError, match="multiple of"):
        small_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="mutually exclusive"):
        small_config(norm_before_fc=True, fc_norm=True)
    with pytest.raises(ValueError, match="positive"):
        small_config(intermediate_size=0)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        small_config(draft_vocab_size=41)
    with pytest.raises(ValueError, match="rope"):
        small_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    assert small_config(head_dim=None).head_dim == 8
    assert small_config(target_hidden_size=None).target_hidden_size == 32


def test_from_speculators_config_rejects_unsupported_layers():
    base = example_config().to_speculators_config()
    for key, value in [("attention_bias", True), ("use_sliding_window", True), ("model_type", "qwen3"),
                       ("layer_types", ["sliding_attention", "full_attention"])]:
        d = json.loads(json.dumps(base))
        d["transformer_layer_config"][key] = value
        with pytest.raises(ValueError):
            DraftConfig.from_speculators_config(d)


def test_from_target():
    target = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
        num_hidden_layers=32, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        architectures=["LlamaForCausalLM"],
    )
    target._name_or_path = "org/target"
    with pytest.raises(ValueError, match="mask_token_id"):
        DraftConfig.from_target(target)
    c = DraftConfig.from_target(target, mask_token_id=299, draft_vocab_size=100)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 8, 2, 8)
    assert (c.intermediate_size, c.vocab_size, c.draft_vocab_size, c.num_hidden_layers) == (96, 300, 100, 4)
    assert c.rope_parameters == target.rope_parameters and c.rope_parameters is not target.rope_parameters
    assert c.aux_layer_ids == [2, 16, 29] and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 16384
    assert c.verifier_name_or_path == "org/target" and c.verifier_architectures == ["LlamaForCausalLM"]
    assert c.target_hidden_size == 64
    c2 = DraftConfig.from_target(target, mask_token_id=0, hidden_size=32, num_hidden_layers=1)
    assert c2.hidden_size == 32 and c2.target_hidden_size == 64 and c2.fc_in_features == 192


def test_save_load_bit_exact(tmp_path):
    config = small_config(norm_before_fc=True)
    model = randomize(PEagleDraft(config))
    vd, v = config.draft_vocab_size, config.vocab_size
    t2d = torch.zeros(v, dtype=torch.bool)
    ids = torch.sort(torch.randperm(v)[:vd]).values
    t2d[ids] = True
    model.set_vocab_mapping(ids - torch.arange(vd), t2d)
    out = tmp_path / "ckpt"
    model.save_pretrained(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dirs left behind
    with open(out / "config.json") as f:
        assert DraftConfig.from_speculators_config(json.load(f)) == config

    loaded = PEagleDraft.from_pretrained(str(out))
    assert loaded.config == config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(loaded.draft_to_target(torch.arange(vd)), ids)
    x_ids, aux, pos = inputs(config)
    with torch.no_grad():
        h1 = model(x_ids, model.project_aux(aux), pos, causal(len(x_ids)))
        h2 = loaded(x_ids, loaded.project_aux(aux), pos, causal(len(x_ids)))
    assert torch.equal(h1, h2)

    # Overwriting an existing checkpoint; bf16 checkpoints load as bf16.
    model.to(torch.bfloat16).save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = PEagleDraft.from_pretrained(out)
    assert loaded.fc.weight.dtype == torch.bfloat16 and loaded.d2t.dtype == torch.int64
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    assert loaded.rotary_emb.inv_freq.dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_full_vocab_checkpoint_has_no_vocab_mapping(tmp_path):
    """vLLM builds draft_id_to_target_id only for a reduced draft vocabulary and refuses a full-vocabulary
    file that carries d2t/t2d: such a checkpoint leaves them out and loads back with the identity mapping."""
    config = small_config(draft_vocab_size=None)
    model = randomize(PEagleDraft(config))
    model.save_pretrained(tmp_path / "full")
    keys = set(load_file(str(tmp_path / "full" / "model.safetensors")))
    assert "d2t" not in keys and "t2d" not in keys and "fc.weight" in keys
    back = PEagleDraft.from_pretrained(tmp_path / "full")
    assert torch.equal(back.draft_to_target(torch.arange(config.vocab_size)), torch.arange(config.vocab_size))
    assert bool(back.t2d.all()) and back.d2t.device.type == "cpu"
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # an older full-vocab file that still carries them loads too
    state = load_file(str(tmp_path / "full" / "model.safetensors"))
    v = config.vocab_size
    state.update(d2t=torch.zeros(v, dtype=torch.long), t2d=torch.ones(v, dtype=torch.bool))
    save_file(state, str(tmp_path / "full" / "model.safetensors"))
    assert torch.equal(PEagleDraft.from_pretrained(tmp_path / "full").fc.weight, model.fc.weight)


def test_aux_layer_ids_distinct_and_increasing():
    """vLLM feeds aux states in increasing layer order and collapses repeats: the config sorts, refuses repeats."""
    assert small_config(aux_layer_ids=[5, 1, 3]).aux_layer_ids == [1, 3, 5]
    with pytest.raises(ValueError, match="distinct"):
        small_config(aux_layer_ids=[2, 2, 1])


def test_serving_warnings_name_what_vllm_cannot_serve(tmp_path):
    from peagle.store.export import serving_warnings

    ok = small_config(verifier_name_or_path=str(tmp_path))
    assert serving_warnings(ok) == []
    assert serving_warnings(small_config(verifier_name_or_path="meta-llama/Llama-3.1-8B-Instruct")) == []
    fc = serving_warnings(small_config(fc_norm=True, verifier_name_or_path=str(tmp_path)))
    assert len(fc) == 1 and "fc_norm" in fc[0]
    lost = serving_warnings(small_config(verifier_name_or_path="peagle-demo-target"))
    assert len(lost) == 1 and "'peagle-demo-target'" in lost[0] and "--verifier" in lost[0]
    assert "--verifier" in serving_warnings(small_config(verifier_name_or_path=""))[0]


def test_from_pretrained_errors(tmp_path):
    config = small_config()
    with pytest.raises(FileNotFoundError, match="config.json"):
        PEagleDraft.from_pretrained(tmp_path)
    PEagleDraft(config).save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    state = load_file(weights)

    bad = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad["speculators_model_type"] = "eagle3"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="peagle"):
        PEagleDraft.from_pretrained(tmp_path / "ok")
    bad["speculators_model_type"] = "peagle"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(bad))

    save_file({k: v for k, v in state.items() if k != "mask_hidden"}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors.*mask_hidden"):
        PEagleDraft.from_pretrained(tmp_path / "ok")
    save_file({**state, "fc.weight": torch.zeros(3, 3)}, str(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors.*fc\.weight"):
        PEagleDraft.from_pretrained(tmp_path / "ok")


# ----------------------------------------------------------------------------------------------------
# The model's maths


@pytest.mark.parametrize("variant", ["plain", "norm_before_fc", "fc_norm"])
def test_mask_hidden_uses_the_aux_projection(variant):
    config = small_config(norm_before_fc=variant == "norm_before_fc", fc_norm=variant == "fc_norm")
    model = randomize(PEagleDraft(config))
    got = model.projected_mask_hidden()
    assert got.shape == (config.hidden_size,)
    torch.testing.assert_close(got, model.project_aux(model.mask_hidden).reshape(-1))
    torch.testing.assert_close(got, model.project_aux(model.mask_hidden.reshape(-1)))

    # By hand: the norm scheme, then fc.
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    x = model.mask_hidden.reshape(-1)
    if variant == "norm_before_fc":
        x = rms(x, model.input_norm.weight)
    elif variant == "fc_norm":
        x = torch.cat([rms(c, n.weight) for c, n in zip(x.chunk(3), model.fc_norm, strict=True)])
    torch.testing.assert_close(got, model.fc.weight @ x)

    if variant != "plain":
        norm = model.input_norm if variant == "norm_before_fc" else model.fc_norm[1]
        with torch.no_grad():
            norm.weight.mul_(2.0)
        assert not torch.allclose(model.projected_mask_hidden(), got)


def reference_forward(model, ids, hidden, pos):
    """Straightforward re-implementation: fused layer 0, plain layers, HF RoPE, dense causal attention."""
    cfg = model.config
    rope = LlamaRotaryEmbedding(cfg.llama_config())
    cos, sin = rope(hidden[None], pos[None])
    m = ids.shape[0]
    mask = torch.ones(m, m, dtype=torch.bool).tril()

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def attn(layer, x):
        a = layer.self_attn
        q = (x @ a.q_proj.weight.T).view(1, m, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = (x @ a.k_proj.weight.T).view(1, m, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = (x @ a.v_proj.weight.T).view(1, m, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) / cfg.head_dim**0.5
        out = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
        return out.transpose(1, 2).reshape(m, -1) @ a.o_proj.weight.T

    def mlp(layer, x):
        p = layer.mlp
        return (F.silu(x @ p.gate_proj.weight.T) * (x @ p.up_proj.weight.T)) @ p.down_proj.weight.T

    l0 = model.layers[0]
    emb = model.embed_tokens.weight[ids]
    normed_hidden = rms(hidden, l0.hidden_norm.weight)
    x = (normed_hidden if cfg.norm_before_residual else hidden) + attn(
        l0, torch.cat([rms(emb, l0.input_layernorm.weight), normed_hidden], -1)
    )
    x = x + mlp(l0, rms(x, l0.post_attention_layernorm.weight))
    for layer in model.layers[1:]:
        x = x + attn(layer, rms(x, layer.input_layernorm.weight))
        x = x + mlp(layer, rms(x, layer.post_attention_layernorm.weight))
    return x


@pytest.mark.parametrize("norm_before_residual", [False, True])
def test_forward_matches_reference(norm_before_residual):
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
    config = small_config(norm_before_residual=norm_before_residual, rope_parameters=rope)
    model = randomize(PEagleDraft(config))
    ids, aux, pos = inputs(config, m=9)
    hidden = model.project_aux(aux)
    with torch.no_grad():
        got = model(ids, hidden, pos, causal(len(ids)))
        ref = reference_forward(model, ids, hidden, pos)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_norm_before_residual_changes_layer0():
    ids, aux, pos = inputs(small_config())
    outs = []
    for flag in (False, True):
        model = randomize(PEagleDraft(small_config(norm_before_residual=flag)))
        with torch.no_grad():
            outs.append(model(ids, model.project_aux(aux), pos, causal(len(ids))))
    assert not torch.allclose(outs[0], outs[1])


def full_pipeline_loss(model, ids, aux, pos, is_mask):
    """The trainer's assembly: real rows project aux, mask rows take projected_mask_hidden()."""
    hidden = torch.where(is_mask[:, None], model.projected_mask_hidden()[None], model.project_aux(aux))
    ids = torch.where(is_mask, model.config.mask_token_id, ids)
    h = model(ids, hidden, pos, causal(len(ids)))
    return model.logits(h).logsumexp(-1).sum() + model.final_hidden(h).pow(2).sum()


def test_gradient_reaches_every_parameter_and_checkpointing_is_exact():
    config = small_config(norm_before_fc=True)
    ids, aux, pos = inputs(config, m=8)
    is_mask = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    grads = []
    for ckpt in (False, True):
        model = randomize(PEagleDraft(config)).train()
        model.gradient_checkpointing = ckpt
        full_pipeline_loss(model, ids, aux, pos, is_mask).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_rope_relative_positions():
    config = small_config(
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )
    model = randomize(PEagleDraft(config))
    ids, aux, pos = inputs(config, m=10)
    hidden = model.project_aux(aux)
    with torch.no_grad():
        base = model(ids, hidden, pos, causal(10))
        shifted = model(ids, hidden, pos + 1000, causal(10))
        scrambled = model(ids, hidden, pos.flip(0), causal(10))
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scrambled, base, atol=1e-3)
    # The frequencies are transformers' own (llama3 scaling applied), kept in fp32 under bf16.
    hf = LlamaRotaryEmbedding(config.llama_config())
    assert torch.equal(model.rotary_emb.inv_freq, hf.inv_freq)
    assert model.to(torch.bfloat16).rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary_emb.inv_freq, hf.inv_freq)


def test_vocab_mapping_and_lm_head_init():
    config = small_config()
    model = PEagleDraft(config)
    assert torch.equal(model.d2t, torch.zeros(24, dtype=torch.long)) and model.t2d.sum() == 24
    t2d = torch.zeros(40, dtype=torch.bool)
    t2d[torch.arange(0, 40, 5)] = True
    t2d[torch.arange(1, 40, 3)[:16]] = True
    t2d[torch.arange(40)[~t2d][: 24 - int(t2d.sum())]] = True
    d2t = t2d.nonzero().squeeze(1) - torch.arange(24)
    with pytest.raises(ValueError, match="disagree"):
        model.set_vocab_mapping(torch.zeros(24, dtype=torch.long), t2d)
    model.set_vocab_mapping(d2t, t2d)
    target_w = torch.randn(40, 32)
    model.init_lm_head_from_target(target_w)
    assert torch.equal(model.lm_head.weight, target_w[t2d])
    assert torch.equal(model.draft_to_target(torch.tensor([0, 23])), t2d.nonzero().squeeze(1)[[0, 23]])
    model.freeze_lm_head()
    assert not model.lm_head.weight.requires_grad
    assert model.embed_tokens.weight.requires_grad and model.mask_hidden.requires_grad
    with pytest.raises(ValueError, match="lm_head"):
        model.init_lm_head_from_target(torch.randn(40, 16))


def test_fused_swiglu_matches_plain_mlp_values_and_gradients():
    import torch.nn.functional as F

    from peagle.model.layers import MLP

    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
                      vocab_size=32, mask_token_id=31)
    mlp = MLP(cfg).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    y = mlp(x)
    w = torch.randn_like(y)
    fused = torch.autograd.grad((y * w).sum(), [x, *mlp.parameters()])
    plain_y = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    plain = torch.autograd.grad((plain_y * w).sum(), [x, *mlp.parameters()])
    assert torch.allclose(y, plain_y)
    for a, b in zip(fused, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("overrides", [{}, {"norm_before_fc": True}])
def test_mask_slots_are_the_projected_mask_hidden(overrides):
    """mask_slots(n): n copies of (mask_token_id, fc(norm?(mask_hidden))); gradients reach mask_hidden."""
    model = PEagleDraft(small_config(**overrides))
    randomize(model, seed=3)
    ids, hidden = model.mask_slots(3)
    assert ids.dtype == torch.long and ids.tolist() == [39, 39, 39]
    row = model.project_aux(model.mask_hidden.reshape(1, -1))[0]
    assert hidden.shape == (3, 32) and torch.equal(hidden, row.expand(3, -1))
    assert torch.equal(hidden[0], model.projected_mask_hidden())
    hidden.sum().backward()
    assert model.mask_hidden.grad is not None and model.mask_hidden.grad.abs().sum() > 0
    ids0, hidden0 = model.mask_slots(0, torch.float64)
    assert ids0.shape == (0,) and hidden0.shape == (0, 32) and hidden0.dtype == torch.float64
    assert model.mask_slots(2, torch.float64)[1].dtype == torch.float64


def test_rms_norm_node_matches_hf_values_and_gradients():
    """The one-node RMSNorm (fp32/fp64) against transformers' LlamaRMSNorm: values in fp32, gradients
    by finite differences in fp64 (gradcheck) and against HF's autograd."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peagle.model.layers import RMSNorm, _RMSNorm

    torch.manual_seed(0)
    ours, hf = RMSNorm(16, 1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16))
        hf.weight.copy_(ours.weight)
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, ref = ours(x), hf(x)
    assert torch.allclose(y, ref, atol=1e-6)
    w = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * w).sum(), [x, ours.weight]),
                    torch.autograd.grad((ref * w).sum(), [x, hf.weight]), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    x64 = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNorm.apply(a, b, 1e-5), (x64, w64))
