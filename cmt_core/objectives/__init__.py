"""Training objectives: ``objective(model, batch, rng) -> per-sample loss`` (see ``base``)."""
