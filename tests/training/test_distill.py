from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from torch import nn  # noqa: E402

from onnxq.training.distill import distill, distillation_loss  # noqa: E402
from onnxq.training.loop import digits_loaders, seed_everything  # noqa: E402


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_loss_matches_the_hand_computed_value():
    student, teacher, label = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 1
    alpha, t = 0.3, 2.0
    p_t = _softmax([v / t for v in teacher])
    p_s = _softmax([v / t for v in student])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    ce = -math.log(_softmax(student)[label])
    expected = alpha * t * t * kl + (1 - alpha) * ce

    got = distillation_loss(
        torch.tensor([student]), torch.tensor([teacher]), torch.tensor([label]), alpha, t
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_the_batch_mean():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    whole = distillation_loss(s, t, y, 0.7, 3.0)
    parts = [
        distillation_loss(s[i : i + 1], t[i : i + 1], y[i : i + 1], 0.7, 3.0) for i in range(4)
    ]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts) / 4, rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_a_copied_teacher_costs_nothing():
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    ce = nn.functional.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0, temperature=4.0), ce)
    assert distillation_loss(s, s, y, alpha=1.0, temperature=4.0).item() == pytest.approx(
        0, abs=1e-6
    )
    assert distillation_loss(s, t, y, alpha=1.0, temperature=4.0).item() > 0.01


def test_no_gradient_reaches_the_teacher_logits():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1]), 0.5, 2.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    ("alpha", "temperature", "match"), [(-0.1, 1.0, "alpha"), (1.5, 1.0, "alpha"), (0.5, 0, "temp")]
)
def test_bad_hyperparameters_are_rejected(alpha, temperature, match):
    with pytest.raises(ValueError, match=match):
        distillation_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1).long(), alpha, temperature
        )


def test_distill_trains_the_student_toward_the_teacher_and_leaves_the_teacher_alone():
    seed_everything(0)
    loaders = digits_loaders(seed=0, train_per_class=10)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.from_numpy(loaders.data.x_test)

    def gap() -> float:
        with torch.no_grad():
            return distillation_loss(
                student(x), teacher(x), torch.zeros(len(x)).long(), 1.0, 4.0
            ).item()

    before = gap()
    history = distill(student, teacher, loaders.train, epochs=3, alpha=1.0, lr=1e-2)
    assert len(history) == 3
    assert gap() < before / 2
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_a_qat_student_distills_from_its_own_float_teacher():
    from onnxq.models.digits import DigitsNet
    from onnxq.training.loop import train
    from onnxq.training.qat import prepare_qat

    seed_everything(0)
    loaders = digits_loaders(seed=0, train_per_class=20)
    teacher = DigitsNet((8, 16, 16))
    train(teacher, loaders.train, epochs=2)
    x = torch.from_numpy(loaders.data.x_train[:64])
    student = prepare_qat(teacher, x[:1], "avx2", [x], weight_bits=2)
    test = torch.from_numpy(loaders.data.x_test)
    labels = torch.from_numpy(loaders.data.y_test)

    def gap() -> float:
        student.eval()
        with torch.no_grad():
            return distillation_loss(student(test), teacher(test), labels, 1.0, 4.0).item()

    before = gap()
    distill(student, teacher, loaders.train, epochs=2, alpha=1.0, lr=1e-3)
    # 2-bit weights put the student measurably off its teacher (KL ~4e-3 here); distilling
    # the fake-quantized model brings it back (~1e-3).
    assert gap() < 0.6 * before
