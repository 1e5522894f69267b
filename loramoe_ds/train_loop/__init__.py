"""The training loop's parts: what a step measures, where it is logged, when to save/stop,
how steps are fed.

* :mod:`~loramoe_ds.train_loop.step_metrics` -- the step-metric schema and its
  reduction over ranks and micro-batches (one place per metric);
* :mod:`~loramoe_ds.train_loop.trackers` -- one tracker per ``output.report_to``
  entry (CSV, TensorBoard, wandb, mlflow);
* :mod:`~loramoe_ds.train_loop.logger` -- rank 0's fan-out of each logged step to
  the trackers;
* :mod:`~loramoe_ds.train_loop.policy` -- checkpoint policy: save every N,
  keep K, stop on preemption / ``stop_after`` / ``max_steps``;
* :mod:`~loramoe_ds.train_loop.step_batches` -- groups a loader's micro-batches into
  optimizer steps across epochs.

:func:`loramoe_ds.run.train` wires them around :class:`~loramoe_ds.parallel.engine.MoETrainer`.
"""
