"""Starts the training loop: on Ray Train (TorchTrainer) or in-process (backend: local)."""

from __future__ import annotations

import logging
import os
from typing import Any

from orchestrator.recipe import Recipe
from storage import fs

log = logging.getLogger(__name__)

# Quiet, non-interactive Ray: no usage-stats prompt, no V1->V2 migration banners.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DEDUP_LOGS": "1",
}


# Storage settings workers need to reach the same buckets as the driver (e.g. an emulator).
# Credentials are not copied: workers find them the way the driver did (metadata server, ADC file).
PASS_THROUGH_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_CLOUD_PROJECT", "ORCHESTRATOR_LOG")


def worker_env() -> dict[str, str]:
    env = dict(RAY_ENV)
    env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ})
    return env


def launch(recipe: Recipe, config: dict[str, Any], address: str | None) -> None:
    if recipe.execution.backend == "local":
        from workers.loop import train_loop
        from workers.preemption import install_sigterm_handler

        install_sigterm_handler()
        train_loop(config)
        return
    launch_ray(recipe, config, address)


def launch_ray(recipe: Recipe, config: dict[str, Any], address: str | None) -> None:
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from workers.loop import train_loop

    ex = recipe.execution
    if not ray.is_initialized():
        # The dashboard stays on: Ray Train V2's placement-group cleaner asks its State API
        # whether the controller lives, and warns every few seconds without it.
        # Worker stdout stays off the driver by default: progress comes from progress.json,
        # failures come back as exceptions; ORCHESTRATOR_WORKER_LOGS=1 shows it all.
        ray.init(address=address, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                 log_to_driver=os.environ.get("ORCHESTRATOR_WORKER_LOGS") == "1",
                 # The setup hook runs in each worker process's main thread, the only thread that
                 # may install the SIGTERM handler that turns GCE's notice into a checkpoint.
                 runtime_env={"env_vars": worker_env(),
                              "worker_process_setup_hook": "workers.preemption.install_sigterm_handler"})
    storage_fs, storage_path = fs.pyarrow_filesystem(recipe.run.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            # A (min, max) range lets Ray Train continue with fewer workers when fewer are there.
            num_workers=(ex.min_workers, ex.num_workers) if ex.min_workers else ex.num_workers,
            use_gpu=ex.use_gpu,
            resources_per_worker={"CPU": ex.cpus_per_worker, **({"GPU": 1} if ex.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            # storage_path/name is the run directory every other file of the run lives in.
            name=recipe.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=ex.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.checkpoint.keep),
        ),
    )
    trainer.fit()
