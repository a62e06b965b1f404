"""Task-independent training machinery: devices and precision, optimisation, checkpoints, errors."""
