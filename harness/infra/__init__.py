"""Infrastructure: distributed (torchrun), preemption, launchers, hardware, loggers."""
