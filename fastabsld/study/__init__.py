"""Studies: many training runs of the recipe compared side by side, launched here or on a SLURM cluster."""
