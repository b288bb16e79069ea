"""Toy tokenizers and tiny random-init targets, built offline.

Nothing can be downloaded from a model hub in tests or in the demo, so this module makes the two
artefacts a real run starts from: a chat tokenizer (byte-level BPE with a chat template whose
assistant turns are marked with ``{% generation %}`` so HF's assistant-token mask works) and a
tiny Llama/Qwen3 causal LM saved with ``save_pretrained``. Callers load both back through the
real ``from_pretrained`` path, so the code under test is the code users run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SYSTEM = "<|system|>"
END = "<|end|>"
NUM_RESERVED = 2
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, SYSTEM, END] + [
    f"<|reserved_{i}|>" for i in range(NUM_RESERVED)
]

# Every turn: "<|role|>\n{content}<|end|>\n"; the assistant's content + <|end|> sit inside the
# generation block (what the draft is trained on); the generation prompt is "<|assistant|>\n".
# Newlines only appear inside Jinja string literals so whitespace control cannot eat them.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message['role'] in ['user', 'system'] -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def train_chat_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE chat tokenizer on ``texts``.

    The result has bos/eos/pad set, the chat special tokens, and ``CHAT_TEMPLATE``. BPE training is
    deterministic, so the vocabulary (and its size, at most ``vocab_size``) depends only on the
    texts. With ``out_dir`` the tokenizer is saved there and reloaded with
    ``AutoTokenizer.from_pretrained`` (the loading path real runs use).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM, END]
        + [f"<|reserved_{i}|>" for i in range(NUM_RESERVED)],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    if out_dir is None:
        return hf
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def tiny_target(
    kind: str,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    extra_vocab: int = 8,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    logit_scale: float = 10.0,
) -> Path:
    """Build a random-init tiny causal LM (``kind`` = "llama" or "qwen3") and save it with the tokenizer.

    ``vocab_size = len(tokenizer) + extra_vocab``: the extra ids exist in the embedding but the
    tokenizer never produces them (usable as a draft mask token). ``lm_head`` is scaled by
    ``logit_scale`` so the random target's distributions are peaked rather than near-uniform.
    Generation stops at ``<|end|>`` or eos. Returns ``out_dir``; load with ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen3Config

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
    common = dict(
        vocab_size=len(tokenizer) + extra_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config = LlamaConfig(**common)
    elif kind == "qwen3":
        config = Qwen3Config(**common)
    else:
        raise ValueError(f"unknown kind {kind!r} (expected 'llama' or 'qwen3')")
    config.dtype = torch.float32

    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(rng_state)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    stop_ids = [tokenizer.convert_tokens_to_ids(END), tokenizer.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
