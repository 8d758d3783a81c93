"""Training stage: plain train/eval steps, class-balanced batches, Ray Train loops."""
