"""Shared session fixtures: a locally trained chat tokenizer, tiny Llama / Qwen3 targets on disk, and the real
SmolLM2-135M-Instruct (``smollm2_dir``, from the ``real`` extra)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peagle.demo.offline_models import tiny_target, train_chat_tokenizer

# The test machine is a couple of cores shared by several jobs: intra-op threads spin-waiting on
# each other make tiny matmuls ~100x slower, so tests run single-threaded unless told otherwise.
torch.set_num_threads(int(os.environ.get("PEAGLE_TEST_THREADS", "1")))

CORPUS = [
    "count from 3 to 9",
    "3 4 5 6 7 8 9",
    "sort these words: pear, apple, fig",
    "apple, fig, pear",
    "The word apple has 5 letters: a-p-p-l-e.",
    "12 + 7 = 19",
    "what is the capital of France? Paris.",
    "Answer briefly. Think step by step.",
] * 8

CHATS = [
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "count from 3 to 9"},
        {"role": "assistant", "content": "3 4 5 6 7 8 9"},
        {"role": "user", "content": "what is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19"},
    ],
    [
        {"role": "user", "content": "sort these words: pear, apple, fig"},
        {"role": "assistant", "content": "apple, fig, pear"},
    ],
    [
        {"role": "user", "content": "how many letters has apple?"},
        {"role": "assistant", "content": "The word apple has 5 letters: a-p-p-l-e."},
    ],
    [
        {"role": "user", "content": "what is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory):
    """Directory holding the toy chat tokenizer (saved with save_pretrained)."""
    d = tmp_path_factory.mktemp("chat_tokenizer")
    train_chat_tokenizer(CORPUS, 300, d)
    return d


@pytest.fixture(scope="session")
def chat_tokenizer(chat_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, chat_tokenizer):
    """Tiny random Llama target (6 layers → aux ids (1, 3, 5)), tokenizer saved alongside."""
    return tiny_target("llama", chat_tokenizer, tmp_path_factory.mktemp("llama"), num_layers=6)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, chat_tokenizer):
    """Tiny random Qwen3 target (8 layers → aux ids (2, 4, 5)), tokenizer saved alongside."""
    return tiny_target("qwen3", chat_tokenizer, tmp_path_factory.mktemp("qwen3"), num_layers=8)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a Hugging Face directory (``peagle.target.real_model``): built
    once from the GGUF file of the ``real`` extra (~1.5 min, ~540 MB) and cached under $PEAGLE_CACHE or
    ~/.cache/peagle/models; skipped, with the install command as reason, when the extra is missing."""
    from peagle.target.real_model import RealModelUnavailable
    from peagle.target.real_model import smollm2_dir as build

    try:
        return build(progress=False)
    except RealModelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """A small OpenAI-messages JSONL file with the CHATS records."""
    p = tmp_path_factory.mktemp("chat_data") / "chats.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return p


def build_chat_tokenizer(out_dir, template, specials, *, bos=None, eos=None, pad=None, vocab_size=400):
    """A byte-level BPE tokenizer trained on CORPUS with the given special tokens and chat template,
    saved to ``out_dir`` (what a real target directory holds); returns ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(CORPUS), trainer=trainer)
    named = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=[
        s for s in specials if s not in named.values()], clean_up_tokenization_spaces=False, **named)
    hf.chat_template = template
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir)
    return out_dir


def full_cod(document_ids, num_depths):
    """Every chain without subsampling (the reference layout of dense checks): ``(anchor[M], depth[M])``.

    Depth 0 is every position; depth d >= 1 every non-padding anchor a whose position a + d lies in the
    same document (document runs are contiguous), in `sample_cod`'s block order. Plain Python loops, so
    it is independent of the tensor code it checks.
    """
    import torch

    ids = document_ids.tolist()
    anchors, depths = list(range(len(ids))), [0] * len(ids)
    for d in range(1, num_depths):
        deep = [a for a in range(len(ids) - d) if ids[a] >= 0 and ids[a + d] == ids[a]]
        anchors += deep
        depths += [d] * len(deep)
    return torch.tensor(anchors, dtype=torch.long), torch.tensor(depths, dtype=torch.long)
