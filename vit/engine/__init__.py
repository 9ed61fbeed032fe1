"""The training engine: the run's config, the tasks it trains (classification, captioning), the
trainer loop, checkpoints and the run directory, the learning-rate schedule, optimizers, the
loader, distributed set-up. Commands import it; the models, layers and data never do."""
