"""Training and fine-tuning of InterFormer (spec §6): losses, optimiser, click simulation, augmentation, data."""
