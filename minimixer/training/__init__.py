"""Training: the loop (loop.py: train_step, fit), its settings (settings.py) and evaluation
(metrics.py). The checkpoint a run writes and resumes from is checkpoints/training_state.py."""
