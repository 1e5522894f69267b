"""The training loop's parts: what a step measures, when to save/stop, how steps are fed.

* :mod:`~loramoe_ds.train_loop.metrics` -- the step-metric schema and its
  reduction over ranks and micro-batches (one place per metric);
* :mod:`~loramoe_ds.train_loop.policy` -- checkpoint policy: save every N,
  keep K, stop on preemption / ``stop_after`` / ``max_steps``;
* :mod:`~loramoe_ds.train_loop.steps` -- groups a loader's micro-batches into
  optimizer steps across epochs.

:func:`loramoe_ds.run.train` wires them around :class:`~loramoe_ds.parallel.engine.MoETrainer`.
"""
