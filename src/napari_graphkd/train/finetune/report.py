"""Reporting a fine-tuning run: held-out scores before and after, and where the new models are."""
from __future__ import annotations

from .plan import MODES, FinetunePlan
from .run import FinetuneResult

SCORE_KEYS = {"recall@0.5": "recall@0.5", "mean_iou": "mean IoU", "aji": "AJI"}


def scores_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """Before/after held-out scores of each role as a fixed-width text table."""
    lines = [f"{'held-out cells':<15}" + "".join(f"{title:>11}" for title in SCORE_KEYS.values())]
    for role, by_time in scores.items():
        for when, values in by_time.items():
            lines.append(f"{role + ' ' + when:<15}" + "".join(f"{values[k]:>11.3f}" for k in SCORE_KEYS))
    return "\n".join(lines)


def no_better_warnings(scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """A warning line for each role whose held-out recall@0.5 + AJI after training is not above before."""
    lines = []
    for role, by_time in scores.items():
        if "after" not in by_time:
            continue
        before, after = by_time["before"], by_time["after"]
        if after["recall@0.5"] + after["aji"] <= before["recall@0.5"] + before["aji"]:
            lines.append(f"warning: the fine-tuned {role} scores no better than before on the held-out cells "
                         f"(recall@0.5 {before['recall@0.5']:.3f} -> {after['recall@0.5']:.3f}, "
                         f"AJI {before['aji']:.3f} -> {after['aji']:.3f}); keep the old model or paint more cells")
    return lines


def scale_line(plan: FinetunePlan) -> str:
    """How the images (or volumes) were brought to the models' scale."""
    if plan.ndim == 2:
        return (f"nuclei of {plan.diameter:.1f} px rescaled to {plan.train_diameter:.1f} px"
                f" (the Segment widget takes this diameter with the new model)")
    voxel = "the models' own voxel size" if plan.voxel_size is None else "voxel " + ":".join(f"{v:g}" for v in plan.voxel_size)
    factors = "x".join(f"{f:.3g}" for f in plan.scale)
    return (f"volumes at {voxel} (z:y:x), rescaled by {factors} (z, y, x) to the models' scale;"
            f" training crops {'x'.join(map(str, plan.crop))} voxels")


def finetune_report(result: FinetuneResult, plan: FinetunePlan) -> str:
    """What was held out, the before/after table, and where the new checkpoints are."""
    lines = [f"{MODES[result.mode]}: {plan.train_cells} cells for training; {result.heldout}", scale_line(plan),
             scores_table(result.scores)]
    if result.decode_tuned_on:
        lines.append(f"decoder settings re-tuned on the {result.decode_tuned_on} and saved with the new models"
                     f" (the 'after' rows use them)")
    lines += no_better_warnings(result.scores)
    if result.cancelled:
        lines.append("cancelled: nothing saved, the models are unchanged")
    lines += [f"saved {role}: {path}" for role, path in result.saved.items()]
    return "\n".join(lines)
