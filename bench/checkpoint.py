"""Checkpoint stall: how long the training thread pauses per checkpoint, background against
synchronous, in the same run. Usage: python -m bench.checkpoint --json

The project's UNet-224 at width 1 (recipes/unet224.yaml's model) with AdamW's state (about 210 MB
of state), checkpointed by the real `Trainer.checkpoint` with the in-process session into run
storage on GCS: gcp-storage-emulator behind the loopback fault proxy adding --latency-ms to every
request, as bench.data does. MLflow is a local sqlite store, so every checkpoint also sends its
metrics and copies the store into run storage, as in local mode.

- background (checkpoint.background: true, the default): the pause is the time `checkpoint()`
  takes on the training thread (progress write, snapshot to CPU memory, start of the upload) plus
  the time of the per-step polls that run its completion (metrics to MLflow, start of the store
  copy). Training steps go on while the upload runs, each one followed by that poll, as in the loop;
  the next checkpoint starts once the upload has landed (`upload_s`), so none waits for another.
- sync (checkpoint.background: false): the whole save on the training thread, `sync_save_s`.

Each mode takes one warm-up checkpoint first (connections, first writes), not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

from bench import machine


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _stats(xs: list[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_mean": round(statistics.fmean(xs), 3), f"{prefix}_max": round(max(xs), 3),
            f"{prefix}_all": [round(x, 3) for x in xs]}


def _trainer(args: argparse.Namespace, data_uri: str, run_dir: str, tracking_uri: str, background: bool) -> Any:
    from mlflow.tracking import MlflowClient

    from common.plan import make_plan
    from common.recipe import validate_recipe
    from storage.plans import save_plan
    from storage.shards import open_dataset
    from workers.session import LocalSession
    from workers.train.trainer import Trainer

    recipe = validate_recipe({
        "run": {"name": "bench", "storage": run_dir.rsplit("/", 1)[0], "seed": 0},
        "data": {"uri": data_uri, "eval_samples": 16},
        "model": {"name": "unet224", "width": args.width},  # recipes/unet224.yaml: width 1.0
        "stages": [{"name": "full", "forward": "full", "trainable": ["all"], "resolution": 64, "batch_size": 2,
                    "chunk_size": 32, "lr": 3e-4}],
        "checkpoint": {"every_steps": 1_000_000, "every_seconds": 1e9, "keep": 3, "background": background},
        "execution": {"backend": "local", "torch_threads": args.threads},
    })
    save_plan(make_plan(recipe, open_dataset(data_uri).sample_ids), run_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    config = {"run_dir": run_dir, "data_uri": data_uri, "task_info": {"baseline_depth": 0.5},
              "tracking_uri": tracking_uri, "mlflow_run_id": run_id}
    trainer = Trainer(recipe, config, LocalSession(run_dir, keep=3))
    trainer.enter_stage(0)
    return trainer


def _step(trainer: Any, x: Any) -> float:
    """One optimizer step (AdamW over every parameter), as training would mutate the state."""
    t0 = time.perf_counter()
    opt = trainer.state.optimizer
    opt.zero_grad(set_to_none=True)
    loss = trainer.state.model(x, "full").square().mean()
    loss.backward()
    opt.step()
    c = trainer.state.cursor
    c.global_step += 1
    c.batch += 1
    trainer.state.pending_metrics.append(("train/loss", float(loss.detach()), c.global_step))
    return time.perf_counter() - t0


def bench_background(args: argparse.Namespace, trainer: Any, x: Any) -> dict[str, Any]:
    writer = trainer.checkpointer.writer
    pauses, calls, polls, uploads, steps_during, step_during = [], [], [], [], [], []
    for i in range(args.checkpoints + 1):
        t0 = time.perf_counter()
        trainer.checkpoint("steps")
        name = writer.in_flight
        call = time.perf_counter() - t0
        poll = 0.0
        landed, n = None, 0
        while True:
            dt = _step(trainer, x)
            n += 1
            if landed is None:
                step_during.append(dt)
            p0 = time.perf_counter()
            idle = writer.poll()  # what the loop does after every step: a landed upload completes here
            poll += time.perf_counter() - p0
            if landed is None and writer.in_flight != name:
                landed = time.perf_counter() - t0
                steps = n
            if idle and landed is not None:
                break
        if i == 0:
            step_during.clear()
            continue  # the warm-up
        pauses.append(call + poll)
        calls.append(call)
        polls.append(poll)
        uploads.append(landed)
        steps_during.append(steps)
    return {**_stats(pauses, "pause_s"), "pause_checkpoint_call_s_mean": round(statistics.fmean(calls), 3),
            "pause_completion_polls_s_mean": round(statistics.fmean(polls), 3), **_stats(uploads, "upload_s"),
            "steps_trained_during_upload": steps_during,
            "step_s_during_upload_mean": round(statistics.fmean(step_during), 3)}


def bench_sync(args: argparse.Namespace, trainer: Any, x: Any) -> dict[str, Any]:
    saves = []
    for i in range(args.sync_checkpoints + 1):
        _step(trainer, x)
        t0 = time.perf_counter()
        trainer.checkpoint("steps")
        if i:
            saves.append(time.perf_counter() - t0)
    return _stats(saves, "sync_save_s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0, help="UNet-224 width (1.0: the source's 17.5M parameters)")
    ap.add_argument("--checkpoints", type=int, default=3, help="background checkpoints measured (after one warm-up)")
    ap.add_argument("--sync-checkpoints", type=int, default=3,
                    help="synchronous checkpoints measured (after one warm-up)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added by the proxy to every request")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    logging.getLogger("storage").setLevel(logging.ERROR)
    logging.getLogger("workers").setLevel(logging.ERROR)
    import torch

    from storage import checkpoints
    from storage import fs as sfs
    from storage.synth import synthesize
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"bench": "checkpoint", "machine": machine(), "load_avg_start": _load(),
                              "latency_ms_per_request": args.latency_ms, "model": f"unet224 width {args.width}"}
    t_bench = time.perf_counter()
    proc, url = start_emulator()
    try:
        with FaultProxy(url) as proxy, tempfile.TemporaryDirectory() as tmp:
            point_gcsfs_at(proxy.url)
            make_bucket("bench")
            data_uri = os.path.join(tmp, "data")
            synthesize(data_uri, 64, seed=0, image_size=64, workers=1)
            tracking_uri = f"sqlite:///{os.path.join(tmp, 'mlflow.db')}"
            proxy.configure(latency_s=args.latency_ms / 1000)
            x = torch.randn(2, 6, 64, 64, generator=torch.Generator().manual_seed(0))
            for background in (True, False):
                run_dir = f"gs://bench/runs-{'bg' if background else 'sync'}/bench"
                trainer = _trainer(args, data_uri, run_dir, tracking_uri, background)
                _step(trainer, x)  # AdamW's state exists from the first step
                try:
                    if background:
                        result["step_s_idle_mean"] = round(statistics.fmean(_step(trainer, x) for _ in range(3)), 3)
                        result.update(bench_background(args, trainer, x))
                    else:
                        result.update(bench_sync(args, trainer, x))
                    if background:
                        sd = trainer.state.state_dict()
                        result["params"] = sum(p.numel() for p in trainer.state.model.parameters())
                        result["state_tensor_mb"] = round(sum(t.numel() * t.element_size() for t in _tensors(sd))
                                                          / 2**20, 1)
                        newest = checkpoints.list_complete(run_dir)[-1]
                        fs, path = sfs.filesystem(sfs.join(run_dir, newest, checkpoints.STATE_FILE))
                        result["state_file_mb"] = round(fs.size(path) / 2**20, 1)
                finally:
                    trainer.close()
            proxy.configure()
    finally:
        stop_emulator(proc)
    result["speedup_sync_over_pause"] = round(result["sync_save_s_mean"] / max(result["pause_s_mean"], 1e-9), 1)
    result["load_avg_end"] = _load()
    result["bench_seconds"] = round(time.perf_counter() - t_bench, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


def _tensors(obj: Any):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


if __name__ == "__main__":
    main()
