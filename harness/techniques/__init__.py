"""The technique catalogue: one module per family (optimizers, schedules, clipping, normalization,
regularization, calibration, quantization), each technique small, named by ``_target_`` in its YAML
(``conf/<group>/<choice>.yaml``, which also cites its paper). ``harness.techniques.registry`` turns a
run's config into technique objects with ``hydra.utils.instantiate``."""
