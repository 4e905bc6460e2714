"""The training recipe of fastabsld: one ABSLD, RSLAD or PGD-AT run, its evaluation, and its commands.

Built on the library (``fastabsld.loss``, ``fastabsld.attack``, ``fastabsld.evaluation``, ...), never
imported by it. Modules, from the inside out:

- ``config`` (:class:`TrainConfig`), ``options`` (its command-line flags and config files), ``runtime``
  (device, seeds), ``schedule`` (LR and beta milestones);
- ``data`` (built-in data sets, image folders, any Dataset), ``models``, ``fold`` (BatchNorm-folded eval
  views), ``speed`` (autocast, channels_last, compile);
- ``steps`` (one batch of each method), ``loop`` (epochs, validation, checkpoints, resume, test),
  ``teacher`` (the teacher's recipe, cache and loading), ``teachers`` (teachers from elsewhere:
  state_dicts, TRADES/RobustBench), ``train`` (one run from its config);
- ``checkpoint`` (checksummed files, the previous one kept), ``runfiles`` (checked reading of run
  files), ``lock`` (one run per folder), ``logs`` (epoch lines, progress bars, TensorBoard), ``errors``
  (what a run reports as one line), ``report`` (metrics.json and a run's plots), ``distributed``
  (torchrun) and ``cli`` (``train`` and ``eval``; the ``fastabsld`` program adds the study's commands,
  see ``fastabsld.study``).
"""
