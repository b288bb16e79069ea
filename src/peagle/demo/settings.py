"""The demos' sizes: `DemoSettings`, the full run (`FULL`) and the ``--quick`` smoke run (`QUICK`); the real-model
demo's `RealSettings` (`REAL_FULL`, `REAL_QUICK`).

Their own module so that the run (`peagle.demo.run`) and its report (`peagle.demo.report`) both read
them without importing each other.
"""

from __future__ import annotations

import dataclasses

from peagle.demo.tiny_lm import TargetSettings

__all__ = ["FULL", "QUICK", "REAL_FULL", "REAL_QUICK", "DemoSettings", "DraftSettings", "RealSettings"]


@dataclasses.dataclass(frozen=True)
class DraftSettings:
    """What every demo sizes alike: the draft, its training and its evaluation (`peagle.demo.stages`
    writes the training config from these, `peagle.demo.report` describes them)."""

    num_al_prompts: int  # held-out prompts scored every eval_every steps during training
    max_new_tokens: int  # generation budget of the evaluation
    max_length: int  # packed row length of training
    draft_vocab_size: int | None
    num_layers: int  # draft decoder layers
    num_depths: int  # K
    steps: int
    micro_batch_size: int
    lr: float
    warmup_steps: int
    eval_every: int
    val_fraction: float


@dataclasses.dataclass(frozen=True)
class DemoSettings(DraftSettings):
    """Sizes of one embedded-demo run (the full demo, or the ``--quick`` smoke run)."""

    target: TargetSettings
    num_chats: int  # training prompts whose responses the target regenerates
    num_eval_prompts: int  # held-out prompts of the final evaluation
    regen_batch_size: int  # (regeneration uses max_new_tokens too)


# Sized for the slowest CPU this project runs on (an AVX2-only 2-core EPYC, 90–140 GFLOP/s): 800 steps over
# 20 000 chats took 16 min there from a fresh clone (AL@4 4.06); 640 over 16 000 fit the 15-min budget
# (the README has the measured figures).
FULL = DemoSettings(
    target=TargetSettings(),
    num_chats=16000,
    num_eval_prompts=200,
    num_al_prompts=24,
    max_new_tokens=96,
    regen_batch_size=128,
    max_length=512,
    draft_vocab_size=None,
    num_layers=2,
    num_depths=4,
    steps=640,
    micro_batch_size=4,
    lr=4e-3,
    warmup_steps=20,
    eval_every=80,
    val_fraction=0.02,
)

QUICK = DemoSettings(
    target=TargetSettings(
        num_train=400,
        num_heldout=12,
        vocab_size=400,
        hidden_size=64,
        num_layers=6,
        num_heads=2,  # head_dim 32: vLLM's CPU attention needs head_dim >= 32
        num_kv_heads=2,
        intermediate_size=128,
        steps=30,
        batch_size=16,
        warmup_steps=5,
        max_new_tokens=48,
    ),
    num_chats=96,
    num_eval_prompts=12,
    num_al_prompts=4,
    max_new_tokens=48,
    regen_batch_size=48,
    max_length=256,
    draft_vocab_size=256,
    num_layers=1,
    num_depths=4,
    steps=6,
    micro_batch_size=2,
    lr=2e-3,
    warmup_steps=1,
    eval_every=3,
    val_fraction=0.1,
)


@dataclasses.dataclass(frozen=True)
class RealSettings(DraftSettings):
    """Sizes of one real-model demo run (``peagle demo --real``: SmolLM2-135M-Instruct)."""

    seed: int  # of the prompt corpus (`peagle.demo.real_corpus`)
    num_prompts: int  # training prompts whose assistant turns the target writes
    heldout_per_kind: int  # held-out prompts of each kind written to data/heldout/<kind>.jsonl ...
    eval_per_kind: int  # ... the first of which the final evaluation uses (data/heldout.jsonl)
    regen_max_tokens: int  # per regenerated assistant turn
    regen_batch_size: int  # the in-process HF engine's batch (without vLLM)
    cache_states: bool  # `peagle prepare --cache`: the target runs once per example, not every step
    freeze_lm_head: bool  # keep the target's lm_head rows fixed (model.freeze_lm_head)
    al_max_new_tokens: int  # generation budget of the AL measured during training


# Sized for the 30-min cold budget on a 2-core AVX-512 EPYC without AMX (~200 GFLOP/s fp32). Measured alone there
# (2026-12-05), 1200 prompts / 320-token turns / draft vocabulary 16 384 / 600 steps / 60 evaluated prompts of 192
# tokens took 52 min (regenerate 14.3 min at 326 tok/s, prepare + states 7.6, train 17.5 at 1.55 s/step, eval 12)
# for AL@4 1.635; this size took 24.1 min cold alone there for AL@4 1.623 by vLLM (README, "make demo-real").
REAL_FULL = RealSettings(
    seed=0,
    num_prompts=700,
    heldout_per_kind=32,
    eval_per_kind=8,
    regen_max_tokens=192,
    regen_batch_size=32,
    cache_states=True,
    freeze_lm_head=False,
    num_al_prompts=12,
    al_max_new_tokens=96,
    max_new_tokens=128,
    max_length=1024,
    draft_vocab_size=8192,
    num_layers=1,
    num_depths=4,
    steps=500,
    micro_batch_size=1,
    lr=1.5e-3,
    warmup_steps=30,
    eval_every=100,
    val_fraction=0.02,
)

REAL_QUICK = RealSettings(
    seed=0,
    num_prompts=24,
    heldout_per_kind=3,
    eval_per_kind=2,
    regen_max_tokens=48,
    regen_batch_size=24,
    cache_states=True,
    freeze_lm_head=False,
    num_al_prompts=4,
    al_max_new_tokens=32,
    max_new_tokens=32,
    max_length=512,
    draft_vocab_size=4096,
    num_layers=1,
    num_depths=4,
    steps=4,
    micro_batch_size=2,
    lr=1.5e-3,
    warmup_steps=1,
    eval_every=2,
    val_fraction=0.1,
)
