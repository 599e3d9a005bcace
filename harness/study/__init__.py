"""Studies: fair comparisons that end in a verdict. A study file names a task, arms and a tuning
protocol; every arm (the baseline too) gets the same number of quasi-random tuning trials, the
configuration selected on the validation split is re-run with fresh seeds, and the seeds are compared
with the baseline with corrected statistics and the claim's criterion (``reproduced``,
``contradicted`` or ``inconclusive``). Every run is an ordinary run with its own record, launched
through Hydra's launcher by the study sweeper (``hydra_plugins/harness_study_sweeper``)."""
