"""``make bench-gpu``: LoRA-expert costs on a CUDA machine, in bf16, for the packaged SmolLM2 and ``MODEL_PATH``.

Per model (synthetic token ids of a fixed length, the mask-position encoder with upstream-peft LoRA on the model's
default target modules, a linear head):

- ``train_tokens_per_s``: forward + backward + AdamW of one trainable expert (batch x length tokens per step);
- ``memory_per_expert_mib``: the growth of allocated GPU memory per added (frozen) expert, from a line through the
  allocation after each of ``--experts`` experts, and the peak of a training step with all of them loaded;
- ``routed_samples_per_s``: inference with a selector forward plus one mixed-adapter forward (every sample to a
  random one of the experts, peft's per-sample ``adapter_names``) against a single adapter, and their ratio;
- ``ddp``: two-GPU DDP scaling efficiency (2-GPU tokens/s over twice 1-GPU tokens/s at the same per-GPU batch);
  skipped with a note on fewer than 2 GPUs.

Without CUDA it prints one line saying it skipped and exits 0. ``--device cpu --backbone tiny-llama`` runs the same
code on a tiny random model (a dry run for the tests; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, machine_conditions


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: float) -> float:
    return round(n / 2**20, 2)


def build(backbone_name: str, path: str | None, dtype: str, device: torch.device, n_classes: int = 16) -> tuple:
    """(encoder, head, vocab size) on ``device``: the project's mask-position encoder with a first LoRA expert."""
    from conpet_lightning.models.backbone import load_backbone
    from conpet_lightning.models.encoder import MaskEncoder
    from conpet_lightning.models.pet import make_lora_config

    backbone = load_backbone(backbone_name, path=path, dtype=dtype)
    encoder = MaskEncoder(backbone, make_lora_config(4, 1.0, 0.0, model=backbone.model), first_adapter="expert0")
    encoder.to(device)
    head = torch.nn.Linear(int(backbone.model.config.hidden_size), n_classes).to(device)
    return encoder, head, int(backbone.model.config.vocab_size)


def batch(vocab: int, size: int, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic token ids (all real tokens, no padding) with the mask at the middle position."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(10, vocab, (size, length), generator=g).to(device),
        "attention_mask": torch.ones(size, length, dtype=torch.long, device=device),
        "mask_pos": torch.full((size,), length // 2, dtype=torch.long, device=device),
        "labels": torch.randint(0, 16, (size,), generator=g).to(device),
    }


def train_steps(encoder: Any, head: torch.nn.Module, b: dict, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` training steps (after synchronising) of the active adapter and the head."""
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    encoder.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = head(encoder(b["input_ids"], b["attention_mask"], b["mask_pos"]).float())
        loss = torch.nn.functional.cross_entropy(logits.float(), b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start


def infer(encoder: Any, b: dict, names: list[str] | None, repeats: int, device: torch.device, selector: bool) -> float:
    """Seconds of ``repeats`` inference passes: optionally a selector forward, then the (mixed-adapter) forward."""
    encoder.eval()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for _ in range(repeats):
            if selector:
                encoder(
                    b["input_ids"], b["attention_mask"], b["mask_pos"], adapter_names=["selector"] * len(names or [])
                )
            encoder(b["input_ids"], b["attention_mask"], b["mask_pos"], adapter_names=names)
    _sync(device)
    return time.perf_counter() - start


def bench_model(args: argparse.Namespace, name: str, path: str | None, device: torch.device) -> dict[str, Any]:
    """All single-device figures of one model."""
    torch.manual_seed(0)
    encoder, head, vocab = build(name, path, args.dtype, device)
    b = batch(vocab, args.batch_size, args.seq_len, device)
    train_steps(encoder, head, b, args.warmup, device)
    seconds = train_steps(encoder, head, b, args.steps, device)
    tokens_per_s = args.batch_size * args.seq_len * args.steps / seconds

    alloc = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        alloc.append(torch.cuda.memory_allocated(device))
    for e in range(1, args.experts):
        encoder.freeze_adapter(f"expert{e - 1}")
        encoder.add_adapter(f"expert{e}")
        encoder.activate(f"expert{e}")
        if device.type == "cuda":
            alloc.append(torch.cuda.memory_allocated(device))
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_steps(encoder, head, b, 1, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in encoder.named_parameters() if ".expert0." in n)
    per_expert = (alloc[-1] - alloc[0]) / (len(alloc) - 1) if len(alloc) > 1 else None

    encoder.add_adapter("selector")
    inf = batch(vocab, args.infer_batch, args.seq_len, device, seed=1)
    g = torch.Generator().manual_seed(2)
    names = [f"expert{int(i)}" for i in torch.randint(0, args.experts, (args.infer_batch,), generator=g)]
    encoder.activate("expert0", trainable=False)
    infer(encoder, inf, None, 1, device, selector=False)
    infer(encoder, inf, names, 1, device, selector=True)
    single = routed = 0.0
    for _ in range(args.rounds):  # interleaved
        single += infer(encoder, inf, None, args.infer_repeats, device, selector=False)
        routed += infer(encoder, inf, names, args.infer_repeats, device, selector=True)
    n = args.infer_batch * args.infer_repeats * args.rounds
    return {
        "model": path or name,
        "train_tokens_per_s": round(tokens_per_s, 1),
        "memory_per_expert_mib": None if per_expert is None else _mib(per_expert),
        "lora_expert_parameter_mib": _mib(lora_bytes),
        "allocated_mib_by_experts": [_mib(a) for a in alloc],
        "train_step_peak_mib_with_all_experts": None if peak is None else _mib(peak),
        "routed_samples_per_s": round(n / routed, 1),
        "single_adapter_samples_per_s": round(n / single, 1),
        "routed_over_single": round(single / routed, 4),
    }


def _ddp_worker(rank: int, world: int, args: argparse.Namespace, name: str, path: str | None, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    encoder, head, vocab = build(name, path, args.dtype, device)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head})

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, b: dict) -> torch.Tensor:
            return self.m["head"](self.m["encoder"](b["input_ids"], b["attention_mask"], b["mask_pos"]).float())

    ddp = DistributedDataParallel(Wrapped(), device_ids=[rank])
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-4)
    b = batch(vocab, args.batch_size, args.seq_len, device, seed=rank)

    def steps(k: int) -> float:
        dist.barrier()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(k):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(ddp(b).float(), b["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize(device)
        dist.barrier()
        return time.perf_counter() - start

    steps(args.warmup)
    seconds = steps(args.steps)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()


def ddp_scaling(args: argparse.Namespace, name: str, path: str | None, single_tokens_per_s: float) -> dict[str, Any]:
    """Two-GPU DDP tokens/s and its efficiency against the single-GPU figure (same per-GPU batch)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, found {torch.cuda.device_count() if torch.cuda.is_available() else 0}"}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "ddp.json")
        mp.spawn(_ddp_worker, args=(2, args, name, path, out), nprocs=2, join=True)
        seconds = json.loads(Path(out).read_text())["seconds"]
    tokens_per_s = 2 * args.batch_size * args.seq_len * args.steps / seconds
    return {
        "world_size": 2,
        "tokens_per_s": round(tokens_per_s, 1),
        "scaling_efficiency": round(tokens_per_s / (2 * single_tokens_per_s), 4),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark (or skip without CUDA); write ``bench/results/gpu-<timestamp>.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=os.environ.get("MODEL_PATH") or None)
    parser.add_argument("--backbone", default="smollm2", help="packaged model (tiny-llama for a dry run)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--infer-repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[bench-gpu] skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    device = torch.device(args.device)
    models = [(args.backbone, None)] + ([("path", args.model_path)] if args.model_path else [])
    results: dict[str, Any] = {}
    for name, path in models:
        label = path or name
        print(f"[bench-gpu] {label} ...", flush=True)
        results[label] = bench_model(args, name, path, device)
        if device.type == "cuda":
            results[label]["ddp"] = ddp_scaling(args, name, path, results[label]["train_tokens_per_s"])
            torch.cuda.empty_cache()
    conditions = {
        **machine_conditions(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        **{k: v for k, v in vars(args).items() if k != "out"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"conditions": conditions, "models": results}, indent=2, default=str))
    for label, r in results.items():
        ddp = r.get("ddp", {})
        print(
            f"{label}: train {r['train_tokens_per_s']:.0f} tok/s, +{r['memory_per_expert_mib']} MiB/expert, "
            f"routed {r['routed_samples_per_s']:.0f} vs single {r['single_adapter_samples_per_s']:.0f} samples/s "
            f"({r['routed_over_single']:.2f}), DDP x2 efficiency {ddp.get('scaling_efficiency', ddp.get('skipped'))}"
        )
    print(f"[bench-gpu] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
