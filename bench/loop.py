"""Training-loop overhead: the orchestrator's chunk loop against a bare torch loop, same samples.

The bare loop trains on tensors decoded ahead of time (untimed); the orchestrator's loop pays
for everything it does per chunk: preload from shards, JPEG/mask/depth decode and resize, seeded
flips, the chunk-end eval and checkpoint. Usage: python -m bench.loop --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch

from bench import machine


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from common.plan import make_plan
    from common.recipe import validate_recipe
    from storage.plans import save_plan
    from storage.shards import open_dataset
    from storage.synth import synthesize
    from workers.session import LocalSession
    from workers.tasks import Batch
    from workers.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        synthesize(data, args.samples + 16, seed=0, image_size=args.resolution)
        recipe = validate_recipe({
            "run": {"name": "bench", "storage": os.path.join(tmp, "runs"), "seed": 0},
            "data": {"uri": data, "eval_samples": 16},
            "model": {"name": "unet224", "width": args.width},
            "stages": [{"name": "full", "forward": "full", "trainable": ["all"], "resolution": args.resolution,
                        "batch_size": args.batch, "chunk_size": args.samples, "lr": 1e-3}],
            "checkpoint": {"every_steps": 1_000_000, "every_seconds": 1e9},
            "execution": {"backend": "local", "torch_threads": args.threads},
        })
        ds = open_dataset(data)
        run_dir = os.path.join(tmp, "runs", "bench")
        plan = make_plan(recipe, ds.sample_ids)
        save_plan(plan, run_dir)
        config = {"run_dir": run_dir, "data_uri": data, "task_info": {"baseline_depth": 0.5}}

        # Baseline: the same model, losses and optimizer on pre-decoded tensors.
        trainer = Trainer(recipe, config, LocalSession(run_dir, keep=1))
        trainer.enter_stage(0)
        ids = plan.chunk_ids(0, 0)
        rows = ds.read_samples(ids)
        task = trainer.task
        samples = task.samples(rows, args.resolution, ds.describe, train=False)
        whole = task.to_device(samples.__getitems__(list(range(len(samples)))), trainer.device)
        t0 = time.perf_counter()
        for i in range(0, len(ids), args.batch):
            trainer._train_step(Batch(whole.x[i:i + args.batch], tuple(t[i:i + args.batch] for t in whole.targets)),
                                "full")
        bare_s = time.perf_counter() - t0

        # The orchestrator's loop: a fresh trainer so both start from the same weights.
        trainer = Trainer(recipe, config, LocalSession(run_dir, keep=1))
        trainer.enter_stage(0)
        t0 = time.perf_counter()
        trainer.train_chunk(0, 0)
        loop_s = time.perf_counter() - t0

    n = len(ids)
    result = {
        "bench": "loop",
        "machine": machine(),
        "torch_threads": args.threads,
        "samples": n,
        "resolution": args.resolution,
        "batch_size": args.batch,
        "model_width": args.width,
        "bare_samples_per_s": round(n / bare_s, 2),
        "orchestrator_samples_per_s": round(n / loop_s, 2),
        "orchestrator_vs_bare": round(bare_s / loop_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
