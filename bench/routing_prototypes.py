"""Prototype routing on frozen MiniLM features: task-id accuracy on FewRel's VALIDATION split (CPU caps).

Statistics (class means, shared shrunk covariance) stream task by task from the training split; routing is scored
on validation samples of the tasks seen so far. No test data is read. Not part of ``run_all`` (a measurement, not a
target): ``.venv/bin/python -m bench.routing_prototypes`` writes ``bench/results/routing_prototypes.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from conpet_lightning.data.benchmarks import load_benchmark
from conpet_lightning.data.encoding import encode, template_too_long
from conpet_lightning.models.backbone import load_backbone
from conpet_lightning.routing import (
    ClassStatistics,
    class_scores,
    class_to_task_map,
    mahalanobis_task_scores,
    task_id_accuracy,
)

CAPS = {"train": 40, "valid": 10, "test": 20}  # experiments/_base.yaml, CPU default
MAX_LEN, TEMPLATE_FILTER, SPLIT_SEED = 64, 50, 100


@torch.no_grad()
def features(bb: Any, texts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """Mask-position and mean-pooled last hidden states of the frozen backbone, batched by length."""
    enc = [encode(t, bb.tokenizer, bb.markers, MAX_LEN) for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    out = {
        "mask": torch.zeros(len(enc), bb.model.config.hidden_size),
        "mean": torch.zeros(len(enc), bb.model.config.hidden_size),
    }
    pad = bb.tokenizer.pad_token_id
    for s in range(0, len(order), batch):
        rows = order[s : s + batch]
        width = max(len(enc[i].input_ids) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(enc[i].input_ids)
            ids[j, :n] = torch.tensor(enc[i].input_ids)
            att[j, :n] = 1
        hidden = bb.model(input_ids=ids, attention_mask=att).last_hidden_state
        pos = torch.tensor([enc[i].mask_pos for i in rows])
        out["mask"][rows] = hidden[torch.arange(len(rows)), pos]
        out["mean"][rows] = (hidden * att[..., None]).sum(1) / att.sum(1, keepdim=True)
    return out


def main() -> dict[str, Any]:
    """Measure nearest-mean vs shrinkage-Mahalanobis routing after each task; write and return the results."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bench = load_benchmark("fewrel", seed=SPLIT_SEED).capped(**CAPS, seed=0)  # as loop.build_benchmark
    c2t = class_to_task_map(bench.tasks)
    bb = load_backbone("minilm")
    t0 = time.perf_counter()
    data: dict[str, dict[str, Any]] = {}
    for part in ("train", "valid"):
        recs = [
            r for r in bench.iter_records(part) if part != "train" or not template_too_long(r.text, TEMPLATE_FILTER)
        ]
        data[part] = {"feat": features(bb, [r.text for r in recs]), "y": torch.tensor([r.label for r in recs])}
    encode_s = time.perf_counter() - t0
    results: dict[str, Any] = {
        "conditions": {
            "benchmark": "fewrel",
            "split_seed": SPLIT_SEED,
            "caps_per_class": CAPS,
            "max_seq_len": MAX_LEN,
            "backbone": "minilm (frozen, packaged)",
            "scored_on": "valid",
            "stats_from": "train",
            "torch_threads": 1,
            "machine": "shared 2-core CPU",
            "n_train": len(data["train"]["y"]),
            "n_valid": len(data["valid"]["y"]),
            "feature_seconds": round(encode_s, 1),
        },
        "runs": {},
    }
    variants = {
        "euclidean": ("euclidean", "rblw"),
        "mahalanobis_rblw": ("mahalanobis", "rblw"),
        "mahalanobis_oas": ("mahalanobis", "oas"),
        "mahalanobis_fixed0.5": ("mahalanobis", 0.5),
    }
    for pool in ("mean", "mask"):
        xtr, ytr = data["train"]["feat"][pool], data["train"]["y"]
        xva, yva = data["valid"]["feat"][pool], data["valid"]["y"]
        for name, (metric, shrink) in variants.items():
            stats = ClassStatistics(xtr.shape[1], shrinkage=shrink)
            curve, final = [], {}
            for task in range(bench.num_tasks):
                rows = c2t[ytr] == task
                stats.update(xtr[rows], ytr[rows])
                fin = stats.finalize()
                seen = c2t[yva] <= task
                x, gold = xva[seen], c2t[yva[seen]]
                route = mahalanobis_task_scores(x, fin, c2t, metric=metric).argmax(1)
                acc = task_id_accuracy(route, gold, task + 1)
                curve.append(round(acc["macro"], 2))
                if task == bench.num_tasks - 1:
                    cls = fin.class_ids[class_scores(x, fin, metric).argmax(1)]
                    lse = mahalanobis_task_scores(x, fin, c2t, metric=metric, reduce="logsumexp").argmax(1)
                    final = {
                        "task_id_acc_macro": round(acc["macro"], 2),
                        "task_id_acc_micro": round(acc["micro"], 2),
                        "task_id_acc_macro_logsumexp": round(task_id_accuracy(lse, gold, task + 1)["macro"], 2),
                        "class_acc_80way": round(100.0 * float((cls == yva[seen]).double().mean()), 2),
                        "shrinkage": round(fin.shrinkage, 4),
                    }
            results["runs"][f"{pool}/{name}"] = {**final, "task_id_acc_macro_after_each_task": curve}
            print(f"{pool:>4} {name:<22} {final}", flush=True)
    out = Path(__file__).parent / "results" / "routing_prototypes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
