"""Networks: shapes at any input size, parameter counts, the half-resolution student design."""
import pytest
import torch

from napari_graphkd.models import EMBEDDING_DIM, NAMED_CONFIGS, build_model, count_parameters


@pytest.mark.parametrize("name", [n for n in NAMED_CONFIGS if n != "resunet-paper-teacher"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_outputs_have_the_input_size_and_the_embedding_channels(name, size):
    model = build_model(name).eval()
    x = torch.rand(1, model.config.in_channels, *size)
    with torch.no_grad():
        emb, fg = model(x)
    assert emb.shape == (1, EMBEDDING_DIM, *size)
    assert fg is None or fg.shape == (1, 1, *size)


def test_paper_teacher_widths_are_available():
    cfg = NAMED_CONFIGS["resunet-paper-teacher"]
    assert cfg.widths == (32, 64, 179, 349, 680) and cfg.in_channels == 3


def test_half_resolution_student_runs_no_full_resolution_block():
    model = build_model("halfres-student").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(1, 1, 64, 64))
    for h in hooks:
        h.remove()
    assert max(seen) == 32  # every convolution runs at half resolution or below


def test_students_have_at_most_one_percent_of_the_teacher_parameters():
    teacher = count_parameters(build_model("resunet-cpu-teacher"))
    for name in ("halfres-student", "mobile-student"):
        assert count_parameters(build_model(name)) <= 0.01 * teacher, name
