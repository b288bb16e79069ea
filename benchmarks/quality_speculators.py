"""Train speculators' P-EAGLE draft on the batches `benchmarks/quality.py` planned (runs in the peer venv).

Run by ``quality.py`` with the peer venv's python (``../shared/peer-bench/setup_venv.sh``: speculators 0.9.0,
torch 2.13 CPU); not a peagle module (it imports speculators, never peagle). It trains the way speculators'
own ``speculators train --speculator-type peagle`` does, from its own parts:

- the draft from ``create_transformer_layer_config`` + ``PEagleDraftModel.from_training_args`` (the verifier's
  embeddings, trained: P-EAGLE's config sets ``embed_requires_grad=True``; the verifier's lm_head rows of the
  draft vocabulary; its frozen verifier norm + lm_head for the targets), with peagle's draft vocabulary (t2d/d2t),
  mask token and aux layers, so both drafts are the same shape;
- each sample through its dataset path (``BaseDataset.__getitem__``), its EAGLE shift (``shift_batch``) and its
  packing collator (``CollateFn``) — one planned row per optimizer step, as quality.py packed it;
- its COD sampling, KL loss, ``max_anchors`` and ratios (``get_trainer_kwargs``), its optimizer
  (``build_optimizers``: Muon + AdamW by default), its linear schedule with 1 % warmup, bf16 autocast over the
  forward with fp32 master weights, gradient clipping at 1.0 — the defaults of its CLI.

CPU adaptations (stated in the result): ``loss_implementation="eager"`` (its default "fused" loss is a Triton
kernel) and ``draft_attn_impl="sdpa"`` (its option; the default flex attention has no backward on CPU in
torch 2.13); ``draft_arch="llama"`` (its option, so vLLM serves the draft with the same layer as peagle's).
The target states are read from the peagle cache quality.py prepared (the same bf16 tensors peagle trains on).

Writes ``model.save_pretrained`` (speculators' own checkpoint format, which vLLM serves) at every requested
step and prints ``RESULT_JSON {...}`` (losses, train seconds, tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


class CacheReader:
    """Example i's (aux [n, 3H], final [n, H]) from a peagle states cache (``cache_manifest.json`` + bf16
    safetensors shards holding ``aux``, ``final`` and per-example ``offsets``)."""

    def __init__(self, cache_dir: str) -> None:
        self.dir = Path(cache_dir)
        self.manifest = json.loads((self.dir / "cache_manifest.json").read_text())
        self.shard_size = int(self.manifest["shard_size"])
        self._open: dict[int, tuple] = {}

    def get(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        k, j = divmod(int(i), self.shard_size)
        if k not in self._open:
            if len(self._open) > 8:
                self._open.clear()
            f = safe_open(str(self.dir / self.manifest["shards"][str(k)]["file"]), framework="pt")
            self._open[k] = (f, f.get_tensor("offsets").tolist())
        f, off = self._open[k]
        return f.get_slice("aux")[off[j]:off[j + 1]], f.get_slice("final")[off[j]:off[j + 1]]


def build(args, plan: dict):
    """speculators' draft and trainer kwargs, built as its CLI builds them (see the module docstring)."""
    from speculators.models.peagle import PEagleDraftModel
    from speculators.train.cli import create_transformer_layer_config

    layer_config = create_transformer_layer_config(
        verifier_name_or_path=plan["target"], num_layers=plan["num_layers"], draft_arch="llama",
        hidden_act=None, sliding_window=args.sliding_window or 2048,
        full_attention_indices=[] if args.sliding_window else list(range(plan["num_layers"])))
    model = PEagleDraftModel.from_training_args(
        verifier_config=layer_config, t2d=plan["t2d"], d2t=plan["d2t"], verifier_name_or_path=plan["target"],
        draft_vocab_size=int(plan["d2t"].numel()), target_layer_ids=list(plan["aux_layer_ids"]),
        mask_token_id=int(plan["mask_token_id"]), num_depths=plan["num_depths"], draft_attn_impl="sdpa",
        norm_before_residual=False, norm_before_fc=False, fc_norm=False, norm_output=False)
    train_kwargs, _ = PEagleDraftModel.get_trainer_kwargs(
        loss_fn="kl_div", loss_implementation="eager", num_depths=plan["num_depths"],
        down_sample_ratio=args.ratio, down_sample_ratio_min=args.ratio_min, max_anchors=args.max_anchors)
    return model.float(), train_kwargs


def optimizers(model, args, total_steps: int):
    from speculators.train.optimizers import build_optimizers
    from transformers import get_linear_schedule_with_warmup

    cfg = argparse.Namespace(optimizer=args.optimizer, lr=args.lr, weight_decay=0.01, muon_lr=args.lr,
                             muon_momentum=0.95, muon_weight_decay=0.1, muon_ns_steps=5,
                             muon_adjust_lr_fn="match_rms_adamw")
    opts = build_optimizers(model, cfg)
    warmup = total_steps // 100  # its default: 1 % of the total steps
    return opts, [get_linear_schedule_with_warmup(o, warmup, total_steps) for o in opts], warmup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan.pt written by quality.py")
    p.add_argument("--out", required=True, help="folder: step-<N>/ per saved step")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the plan's first rows)")
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--optimizer", default="muon", choices=("muon", "adamw"), help="its CLI default: muon")
    p.add_argument("--lr", type=float, default=1e-3, help="its CLI default: 1e-3")
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--ratio-min", type=float, default=0.2)
    p.add_argument("--max-anchors", type=int, default=512, help="its CLI default: 512")
    p.add_argument("--sliding-window", type=int, default=0, help="0: full attention (peagle's draft)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from speculators.models.eagle3.data import shift_batch
    from speculators.train.data import BaseDataset, CollateFn

    plan = torch.load(args.plan, weights_only=False)
    cache = CacheReader(plan["cache"])
    examples = plan["examples"]

    class PlannedSamples(BaseDataset):
        """Planned examples through speculators' own dataset path (lengths, position_ids added there)."""

        def _compute_approx_lengths(self):
            return [len(examples[i][0]) for i in sorted(examples)]

        def _get_raw_data(self, index: int):
            ids, mask = examples[index]
            aux, final = cache.get(index)
            return {"hidden_states": aux, "input_ids": torch.tensor(ids), "verifier_last_hidden_states": final,
                    "loss_mask": torch.tensor(mask)}

    torch.manual_seed(args.seed)
    model, train_kwargs = build(args, plan)
    dataset = PlannedSamples(plan["max_length"], torch.bfloat16)
    collate = CollateFn(plan["max_length"], model.hidden_size, num_target_layers=len(plan["aux_layer_ids"]),
                        dtype=torch.bfloat16, preprocess=shift_batch)
    opts, scheds, warmup = optimizers(model, args, args.steps)
    keys = ("hidden_states", "input_ids", "verifier_last_hidden_states", "loss_mask", "position_ids",
            "document_ids")
    losses, tokens, train_s, saved = [], 0, 0.0, {}
    model.train()
    for step in range(args.steps):
        row = plan["steps"][step]
        t0 = time.perf_counter()
        batch = collate([dataset[i] for i in row])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss, _metrics = model(**{k: batch[k] for k in keys}, **train_kwargs)
        for o in opts:
            o.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
        for s in scheds:
            s.step()
        train_s += time.perf_counter() - t0
        tokens += sum(len(examples[i][0]) for i in row)
        losses.append(float(loss.detach()))
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            rate = tokens / train_s
            print(f"speculators step {step + 1}/{args.steps} loss {losses[-1]:.4f} {rate:.0f} tok/s "
                  f"ETA {(args.steps - step - 1) * train_s / (step + 1):.0f}s", file=sys.stderr, flush=True)
        if step + 1 in args.save_at or step + 1 == args.steps:
            out = Path(args.out) / f"step-{step + 1:06d}"
            model.save_pretrained(str(out))
            saved[step + 1] = {"dir": str(out), "train_tokens": tokens, "train_s": train_s}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from importlib.metadata import version

    print("RESULT_JSON " + json.dumps({
        "trainer": "speculators", "version": version("speculators"), "steps": args.steps, "losses": losses,
        "train_s": train_s, "train_tokens": tokens, "saved": saved, "warmup_steps": warmup,
        "params_total": total, "params_trainable": trainable,
        "settings": {"optimizer": args.optimizer, "lr": args.lr, "max_anchors": args.max_anchors,
                     "ratio": args.ratio, "ratio_min": args.ratio_min, "schedule": "linear, 1 % warmup",
                     "autocast": "bf16", "loss": "kl_div (eager)", "attention": "sdpa", "draft_arch": "llama",
                     "embeddings": "verifier's, trained (PEagleSpeculatorConfig's embed_requires_grad=True)",
                     "lm_head": "verifier's draft-vocab rows, trained"}}), flush=True)


if __name__ == "__main__":
    main()
