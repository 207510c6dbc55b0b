"""Training: trainer, dataset, captions, latent cache, buckets, schedules, recipes, jobs."""
