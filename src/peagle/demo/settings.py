"""The demo's sizes: `DemoSettings`, the full run (`FULL`) and the ``--quick`` smoke run (`QUICK`).

Their own module so that the run (`peagle.demo.run`) and its report (`peagle.demo.report`) both read
them without importing each other.
"""

from __future__ import annotations

import dataclasses

from peagle.demo.tiny_lm import TargetSettings

__all__ = ["FULL", "QUICK", "DemoSettings"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (the full demo, or the ``--quick`` smoke run)."""

    target: TargetSettings
    num_chats: int  # training prompts whose responses the target regenerates
    num_eval_prompts: int  # held-out prompts of the final evaluation
    num_al_prompts: int  # held-out prompts scored every eval_every steps during training
    max_new_tokens: int  # generation budget (regeneration and evaluation)
    regen_batch_size: int
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
