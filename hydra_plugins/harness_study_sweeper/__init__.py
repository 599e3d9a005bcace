"""Hydra sweeper plugin of the harness: ``hydra/sweeper=harness_study`` runs a study (see
``harness.study``). Hydra discovers sweepers only in the ``hydra_plugins`` namespace package."""
