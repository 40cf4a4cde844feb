"""Training loops (segmentation and distillation) and their resumable state."""
