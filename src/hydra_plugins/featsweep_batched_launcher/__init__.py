"""featsweep's batched Hydra launcher (``hydra/launcher=batched``)."""
