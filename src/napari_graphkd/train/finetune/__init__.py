"""Fine-tuning and distillation on a user's own, partially annotated images, all in memory.

Three modes: ``distil`` (the student learns from the teacher only), ``finetune`` (the student
learns from the annotation plus graph distillation from the teacher) and ``teacher`` (the
teacher is fine-tuned on the annotation, then the student is fine-tuned from the new teacher).

Modules by step: :mod:`.rules` (what a partial annotation teaches, held-out cells and their
scores), :mod:`.plan` (validating the inputs and building the training samples at the model's
scale), :mod:`.run` (scoring, training, saving new checkpoints) and :mod:`.report` (text).
"""
from .plan import MODES, AnnotatedImage, FinetunePlan, FinetuneSettings, HeldOut, annotated_window, plan_finetune
from .report import finetune_report, scores_table
from .rules import annotation_map, exclude_cells, heldout_metrics, pseudo_instances, split_cells
from .run import DEFAULT_FOLDER, FinetuneResult, run_finetune, save_new_checkpoint

__all__ = ["DEFAULT_FOLDER", "MODES", "AnnotatedImage", "FinetunePlan", "FinetuneResult", "FinetuneSettings", "HeldOut",
           "annotated_window", "annotation_map", "exclude_cells", "finetune_report", "heldout_metrics", "plan_finetune",
           "pseudo_instances", "run_finetune", "save_new_checkpoint", "scores_table", "split_cells"]
