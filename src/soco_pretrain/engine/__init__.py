"""The training engine every stage runs on (pretraining, fine-tuning, the linear probe).

``trainer`` (the loop: ``Trainer``, ``Hook``, ``StepOutput``, ``set_lr``, ``autocast``),
``metrics`` (loss window, non-finite guard, metrics.jsonl, TensorBoard, progress bar),
``checkpoint`` (atomic checkpoints, RNG states, retention, the ``Checkpointer``),
``distributed`` (torchrun/SLURM set-up, collectives), ``schedule`` (warm-up + cosine lr, the
linear scaling rule, the EMA momentum), ``skips`` (the skipped-image log),
``loader`` (the DataLoader factory). Import from the modules; this package imports nothing
heavy so ``soco --help`` stays fast.
"""
