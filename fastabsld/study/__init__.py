"""Studies of fastabsld: many training runs and their comparison, built on the recipe's one run.

Imports the recipe and the library, never imported by them. Modules:

- ``statistics`` (means, paired differences, bootstrap intervals and Holm-corrected verdicts from the
  runs' per-example results), ``compare`` (methods x seeds on one data set and one cached teacher, one
  table), ``demo`` (RSLAD against ABSLD on digits), ``report`` (the tables and plots of many runs)
  and ``cli`` (the ``fastabsld`` program: the recipe's ``train`` and ``eval`` with ``demo`` and
  ``compare``); ``launchers`` (where compare's runs train: this machine), ``slurm`` (a SLURM job array
  through submitit) and ``launcher_options`` (their command line flags).
"""
