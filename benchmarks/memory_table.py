"""Per-rank bytes of a P-EAGLE draft's weights, gradients and AdamW state: DDP vs FSDP2 (docs/training.md).

Each draft is built on the meta device from its `DraftConfig` (no memory is allocated), so parameters are
counted exactly: 4 draft layers at the target's width, embeddings over the target vocabulary, fc (3H → H),
the mask hidden row, norms, and lm_head over a draft vocabulary of 32000. Activations are left aside.

Bytes per parameter (every parameter trainable, the default):
  * DDP: fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8 = 16, on every rank; its peak adds
    DDP's gradient buckets, 4 more (peagle's DDP copies gradients into them: gradient_as_bucket_view off).
    Not counted: bf16 autocast's per-forward cache of bf16 weight casts (up to 2 more).
  * FSDP2 over W ranks: the same 16 per parameter, sharded: each rank keeps dim-0 shards of ceil(rows / W)
    rows (FSDP2 pads dim 0 to a multiple of W; counted exactly). While a step runs, bf16 compute copies are
    gathered (train.dtype bf16 on CUDA: MixedPrecisionPolicy(bf16, fp32 reduce)):
      - flat, grad_accum 1: the root group (embeddings, fc, norms, mask_hidden, lm_head: gathered from the
        step's first forward to its backward) and two layers (the one running, the one prefetched), their
        bf16 gradients, and the fp32 reduce-scatter input of the largest group;
      - grad_accum > 1 or sequence partitions: the gradients of the whole draft accumulate unsharded in fp32
        (4 per parameter) between micro-batches, each backward's bf16 gradients added group by group; with
        partitions the whole draft also stays gathered in bf16 (2 per parameter) for the step (counted).
  * Replicated on every rank in both modes (buffers, not sharded by FSDP2): the trainer's target head (the
    target's final norm and its lm_head rows of the draft vocabulary; fp32, as a run from a state cache
    loads it) and the draft's vocabulary maps.

    python benchmarks/memory_table.py [--world 8] [--gpu-gib 79.6] [--gpt-oss-intermediate 2880]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from peagle.model.config import DraftConfig
from peagle.model.draft import PEagleDraft
from peagle.model.loss import TargetHead
from peagle.model.step import PEagleTrainer

GIB = 2**30
DRAFT_LAYERS, DRAFT_VOCAB = 4, 32000
ADAM_STATE = 16  # bytes/param: fp32 weight + fp32 gradient + two fp32 AdamW moments
GATHERED = 2  # bytes/param of a bf16 compute copy (weights or gradients)
REDUCE = 4  # bytes/param of fp32 gradients: accumulated unsharded, a reduce-scatter input, DDP's buckets


def targets(gpt_oss_intermediate: int) -> dict[str, dict[str, int]]:
    """The three targets' widths (their config.json). GPT-OSS-120B's MLP is a mixture of experts; its draft
    uses one dense SwiGLU MLP, here of ``gpt_oss_intermediate`` (default: the config's intermediate_size,
    2880, the width one expert has — what `DraftConfig.from_target` copies)."""
    return {
        "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256),
        "Llama-3.3-70B": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                              num_key_value_heads=8, head_dim=128, vocab_size=128256),
        "GPT-OSS-120B": dict(hidden_size=2880, intermediate_size=gpt_oss_intermediate, num_attention_heads=64,
                             num_key_value_heads=8, head_dim=64, vocab_size=201088),
    }


@dataclass
class Draft:
    """A draft's parameter counts by FSDP2 group (layers, root) and its replicated buffer bytes."""

    params: list[tuple[str, torch.Size]]
    layer_params: list[int]
    root_params: int
    buffer_bytes: int

    @property
    def total(self) -> int:
        return sum(self.layer_params) + self.root_params


def build(shape: dict[str, int]) -> Draft:
    """The trainer of a P-EAGLE draft for a target of ``shape``, on the meta device: parameter counts."""
    cfg = DraftConfig(**shape, num_hidden_layers=DRAFT_LAYERS, draft_vocab_size=DRAFT_VOCAB,
                      mask_token_id=shape["vocab_size"] - 1, num_speculative_tokens=8)
    with torch.device("meta"):
        draft = PEagleDraft(cfg)
        head = TargetHead(torch.empty(cfg.hidden_size), 1e-5, torch.empty(DRAFT_VOCAB, cfg.hidden_size))
        trainer = PEagleTrainer(draft, target_head=head)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in draft.layers]
    root = sum(p.numel() for p in draft.parameters()) - sum(layers)
    buffers = sum(b.numel() * b.element_size() for n, b in trainer.named_buffers() if "rotary" not in n)
    return Draft([(n, p.shape) for n, p in draft.named_parameters()], layers, root, buffers)


def sharded_bytes(draft: Draft, world: int) -> int:
    """Bytes of one rank's shards (16 per parameter): dim 0 split into ceil(rows / world) rows per rank."""
    return sum(-(-shape[0] // world) * (shape.numel() // shape[0]) for _, shape in draft.params) * ADAM_STATE


def rows(world: int, gpt_oss_intermediate: int) -> list[dict[str, float | int | str]]:
    """One table row per target: parameters and per-rank GiB."""
    out = []
    for name, shape in targets(gpt_oss_intermediate).items():
        d = build(shape)
        largest = max([d.root_params, *d.layer_params])
        two_layers = sum(sorted(d.layer_params)[-2:])
        sharded = sharded_bytes(d, world)
        flat = (d.root_params + two_layers) * 2 * GATHERED + largest * REDUCE
        accum = d.total * (REDUCE + GATHERED) + largest * GATHERED  # + a group's bf16 gradient before it is added
        out.append({
            "target": name, "params": d.total, "layer": d.layer_params[0], "root": d.root_params,
            "ddp": (d.total * ADAM_STATE + d.buffer_bytes) / GIB,
            "ddp_peak": (d.total * (ADAM_STATE + REDUCE) + d.buffer_bytes) / GIB,
            "fsdp_sharded": (sharded + d.buffer_bytes) / GIB,
            "fsdp_flat": (sharded + flat + d.buffer_bytes) / GIB,
            "fsdp_accum": (sharded + accum + d.buffer_bytes) / GIB,
            "buffers": d.buffer_bytes / GIB,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=8, help="GPUs (FSDP2 ranks)")
    ap.add_argument("--gpu-gib", type=float, default=79.6, help="memory of one GPU (an 80 GB H100: 79.6 GiB)")
    ap.add_argument("--gpt-oss-intermediate", type=int, default=2880, help="GPT-OSS-120B draft's dense MLP width")
    args = ap.parse_args()
    table = rows(args.world, args.gpt_oss_intermediate)
    fits = {True: "yes", False: "**no**"}
    print(f"| target | draft params (layer 0 / root) | DDP state | DDP peak | FSDP2 state | FSDP2 peak, A = 1, "
          f"S = 1 | FSDP2 peak, A > 1 or S > 1 | peak fits {args.gpu_gib:g} GiB: DDP / FSDP2 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        ddp, worst = float(r["ddp_peak"]), max(float(r["fsdp_flat"]), float(r["fsdp_accum"]))
        print(f"| {r['target']} | {r['params'] / 1e9:.3f} B ({r['layer'] / 1e6:.0f} M / {r['root'] / 1e6:.0f} M) | "
              f"{r['ddp']:.1f} | {ddp:.1f} | {r['fsdp_sharded']:.1f} | {r['fsdp_flat']:.1f} | "
              f"{r['fsdp_accum']:.1f} | {fits[ddp < args.gpu_gib]} / {fits[worst < args.gpu_gib]} |")
    print(f"\nGiB per rank, {args.world} GPUs, activations aside; the replicated buffers (target head in fp32, "
          "vocabulary maps) are included: " + ", ".join(f"{r['target']} {r['buffers']:.2f} GiB" for r in table))


if __name__ == "__main__":
    main()
