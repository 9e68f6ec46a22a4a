"""Knowledge distillation (Hinton, Vinyals and Dean 2015) as a loss hook for the one training loop.

The student minimizes ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) *
CE``. The teacher travels to the Ray Train workers as its artifact files (bytes) and runs there
through the same runtime registry as everywhere else, so any variant format can teach.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.models.artifact import artifact_files
from kiln.models.inference_runtime import Runtime


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    ce_loss,
) -> torch.Tensor:
    """Soft-target KL at temperature T (scaled by T^2 so its gradients keep their size) plus
    hard-label CE."""
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
    ) * (t * t)
    return alpha * soft + (1.0 - alpha) * ce_loss(student_logits, labels)


class DistillationLoss:
    """``LoopHooks.loss``: picklable; builds the teacher's runtime lazily inside the worker."""

    def __init__(self, teacher_dir: str | Path, temperature: float, alpha: float):
        teacher_dir = Path(teacher_dir)
        self.files = {
            p.relative_to(teacher_dir).as_posix(): p.read_bytes()
            for p in artifact_files(teacher_dir)
        }
        self.temperature = temperature
        self.alpha = alpha
        self._runtime: Runtime | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_runtime"] = state["_tmp"] = None
        return state

    def _teacher(self):
        if self._runtime is None:
            from kiln.models.artifact import load_spec
            from kiln.models.inference_runtime import make_runtime

            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-teacher-")
            root = Path(self._tmp.name)
            for name, data in self.files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            self._runtime = make_runtime(root, load_spec(root))
        return self._runtime

    def __call__(
        self, logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, ce_loss
    ) -> torch.Tensor:
        teacher = torch.from_numpy(np.asarray(self._teacher()(xb.detach().cpu().numpy()))).to(
            logits.device
        )
        return hinton_loss(logits, teacher, yb, self.temperature, self.alpha, ce_loss)
