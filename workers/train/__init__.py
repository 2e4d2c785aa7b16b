"""What a Ray Train worker runs to train: a trainer that advances steps and asks, and the
components that decide.

- `entry.train_loop`: the entry point (Ray Train's worker function, or the in-process backend's call);
- `trainer.Trainer`: the chunk loop and the step; it asks the others, it decides nothing itself;
- `checkpointer.Checkpointer`: when to save, the save itself, restore with fallback, restarts;
- `stops.Stop`: a preemption notice, a user's interrupt or a fatal error, as a value;
- `divergence.LossWatch`: the loss buffer and the non-finite streak;
- `evaluation.Evaluator`: held-out metrics and the prediction grid;
- `sink.NullSink`: the metrics sink of a worker that logs to no MLflow run;
- `optim`: freezing, the optimizer and the schedule, shared with the LR range test;
- `errors`: the failures recorded for the driver (error.json).

Nothing is imported here: `workers.train.optim` must stay importable without the loop's modules.
"""
