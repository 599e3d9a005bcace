"""The technique catalogue: one module per family (optimizers, schedules, clipping, normalization,
regularization, calibration, quantization), each technique small, named, registered with its paper.
``harness.techniques.registry`` turns a run's config into technique objects."""
