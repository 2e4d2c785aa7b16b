"""Starts the training loop: on Ray Train (TorchTrainer) or in-process (backend: local)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from common.recipe import Recipe
from storage import checkpoints, fs

log = logging.getLogger(__name__)

# Quiet, non-interactive Ray: no usage-stats prompt, no V1->V2 migration banners.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DEDUP_LOGS": "1",
    # Ray Train's controller registers a reported checkpoint only when it next polls the workers
    # (every 2 s by default), and the loop waits for that commit before it sends the metrics the
    # checkpoint holds to MLflow. At 0.5 s the tiny test recipe (25 checkpoints) runs on Ray in
    # 40 s instead of 84 s, same weights; lost workers are also noticed sooner.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # How often Ray Train looks for a drain (preemption) notice: 5 s by default, a sixth of the
    # 30 s a GCE Spot VM gets between its notice and its end.
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
}


# Storage settings workers need to reach the same buckets as the driver (e.g. an emulator), and
# the metadata server Google's libraries (and workers/gce_notice.py's preemption watch) talk to.
# Credentials are not copied: workers find them the way the driver did (metadata server, ADC file).
PASS_THROUGH_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_CLOUD_PROJECT",
                    "ORCHESTRATOR_LOG",
                    "GCE_METADATA_HOST")


SETUP_HOOK = "workers.preemption.install_sigterm_handler"


def worker_env() -> dict[str, str]:
    env = dict(RAY_ENV)
    env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ})
    return env


def launch(recipe: Recipe, config: dict[str, Any], address: str | None) -> None:
    if recipe.execution.backend == "local":
        from workers.preemption import install_sigterm_handler
        from workers.train.entry import train_loop

        install_sigterm_handler()
        train_loop(config)
        return
    launch_ray(recipe, config, address)


def init_ray(address: str | None) -> None:
    """Connect to (or start) Ray the way every driver of ours does; a no-op when connected."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return
    # The dashboard stays on: Ray Train V2's placement-group cleaner asks its State API
    # whether the controller lives, and warns every few seconds without it.
    # Worker stdout stays off the driver by default: progress comes from progress.json,
    # failures come back as exceptions; ORCHESTRATOR_WORKER_LOGS=1 shows it all.
    # The setup hook runs in each worker process's main thread, the only thread that may
    # install the SIGTERM handler that turns GCE's notice into a checkpoint. A Ray Job's driver
    # (orchestrator/jobs.py) already has the same runtime env from its submission, and Ray
    # refuses to merge two that name the same keys.
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    runtime_env = None if in_job else {"env_vars": worker_env(), "worker_process_setup_hook": SETUP_HOOK}
    # "local", not None, without --address: None would join whatever cluster
    # /tmp/ray/ray_current_cluster names, and hang when that cluster is gone.
    options = {"address": address or "local", "dashboard_host": "127.0.0.1", "logging_level": logging.WARNING,
               "log_to_driver": os.environ.get("ORCHESTRATOR_WORKER_LOGS") == "1", "runtime_env": runtime_env}
    if address:
        ray.init(**options)
        return
    _start_local_ray(ray, options)


# Ray gives a new local node 30 s (hard-coded in ray/_private/node.py) to register its raylet;
# a loaded 2-core machine can miss that, and Ray raises a bare Exception saying so. It is a
# transient fault: started again, the node comes up (seen in CI rehearsals under load).
STARTUP_TIMED_OUT = "timed out during startup"
LOCAL_START_ATTEMPTS = 2


def _start_local_ray(ray: Any, options: dict[str, Any]) -> None:
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed

    def again(state: Any) -> None:
        log.warning("Ray's local node did not start in time (%s); starting it again", state.outcome.exception())
        ray.shutdown()

    for attempt in Retrying(stop=stop_after_attempt(LOCAL_START_ATTEMPTS), wait=wait_fixed(1), reraise=True,
                            retry=retry_if_exception(lambda e: STARTUP_TIMED_OUT in str(e)), before_sleep=again):
        with attempt:
            ray.init(**options)


def scaling_config(ex: Any):
    """Ray Train's ScalingConfig for a recipe's execution section: GPUs and TPUs are Ray resources,
    so the autoscaler starts the node types that have them (ray_cluster*.yaml)."""
    import ray.train

    return ray.train.ScalingConfig(
        # A (min, max) range lets Ray Train continue with fewer workers when fewer are there.
        num_workers=(ex.min_workers, ex.num_workers) if ex.min_workers else ex.num_workers,
        use_gpu=ex.use_gpu,
        # TPU: one worker per TPU VM host, placed by Ray on a slice of this topology.
        use_tpu=ex.use_tpu, topology=ex.tpu_topology, accelerator_type=ex.tpu_accelerator_type,
        resources_per_worker={"CPU": ex.cpus_per_worker, **({"GPU": 1} if ex.use_gpu else {}),
                              **({"TPU": ex.tpus_per_worker} if ex.use_tpu else {})},
    )


def _sigint_chained_trainer() -> type:
    """TorchTrainer whose SIGINT handler (abort the run at once) becomes the second press: the
    first asks the workers for a checkpoint and a clean stop (orchestrator/interrupt.py). Ray
    installs its handler in fit(), through this one method; if an upgrade moves it, the SIGINT
    test in tests/test_tracking_survives.py fails."""
    import signal

    from ray.train.torch import TorchTrainer

    class ChainedTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            from orchestrator import interrupt

            stop = interrupt.active()
            if stop is not None:
                stop.take_over(signal.getsignal(signal.SIGINT))

    return ChainedTorchTrainer


# Ray Train's record of the run's checkpoints, in the run directory (its CheckpointManager).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def set_aside_stale_ray_snapshot(run_dir: str) -> bool:
    """Ray Train's controller refuses to start when its snapshot names a checkpoint folder that is
    gone or was never completed (a VM lost while Drive synced the snapshot but not the folder:
    "Path not found"), or when the snapshot itself is torn. Our workers restore from run storage
    (newest usable checkpoint first), not from Ray's pick, so such a snapshot is moved aside and
    Ray starts with none; the cost is that Ray's num_to_keep no longer knows the older folders.
    True when it was moved."""
    uri = fs.join(run_dir, RAY_SNAPSHOT)
    try:
        raw = fs.read_bytes(uri)
    except FileNotFoundError:
        return False
    reason = None
    try:
        snap = json.loads(raw)
        entries = [*snap.get("checkpoint_results", []), *snap.get("pending_training_results", []),
                   *([snap["latest_checkpoint_result"]] if snap.get("latest_checkpoint_result") else [])]
        names = {e["checkpoint_dir_name"] for e in entries}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = f"it is torn ({type(exc).__name__})"
        names = set()
    complete = set(checkpoints.list_complete(run_dir))
    missing = sorted(names - complete)
    if missing:
        reason = f"it names checkpoint folders that are missing or incomplete: {', '.join(missing)}"
    if reason is None:
        return False
    log.warning("Ray Train's checkpoint record %s is unusable (%s); setting it aside, the run resumes from the newest "
                "usable checkpoint in run storage", uri, reason)
    fs.write_bytes(f"{uri}.stale", raw)
    fs.remove(uri)
    return True


def launch_ray(recipe: Recipe, config: dict[str, Any], address: str | None) -> None:
    import ray.train

    from workers.train.entry import train_loop

    ex = recipe.execution
    _Trainer = _sigint_chained_trainer()  # noqa: N806 - a class
    init_ray(address)
    # Ray Train reads this in its controller, which takes it from the driver's environment. Ray
    # counts a drained node as free until its group start times out: with a (min, max) range,
    # this is how long a preempted run waits before it shrinks.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(ex.worker_start_timeout_s)
    set_aside_stale_ray_snapshot(config["run_dir"])
    storage_fs, storage_path = fs.pyarrow_filesystem(recipe.run.storage)
    if storage_fs is None:
        storage_fs = checkpoints.pausing_local_filesystem()  # tests only: None unless asked for
    trainer = _Trainer(
        train_loop,
        train_loop_config=config,
        scaling_config=scaling_config(ex),
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
