"""Training: config-driven loop (``loop``), pure schedules, optimizers, precision, data order,
atomic checkpoints with exact resume, method pipelines, and the distributed/sharded classifier."""
