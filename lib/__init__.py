"""The library the course files import: configuration, devices and DDP, checkpoints, sampling, reliability."""
