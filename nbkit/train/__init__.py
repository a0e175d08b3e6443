"""Two-stage DreamBooth training (text encoder, then UNet) with accelerate.

`train(session, ...)` is the entry point; see `nbkit.train.trainer`. The submodules are imported on
first use, so `import nbkit.train.oom` (say) loads neither torch, diffusers and accelerate nor checks
their versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbkit.train.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nbkit.compat import check_versions

        # A bad transformers/peft/diffusers/accelerate pairing is reported here, in one paragraph,
        # before the trainer's imports could fail with a traceback.
        check_versions("train")
        from nbkit.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'nbkit.train' has no attribute {name!r}")
