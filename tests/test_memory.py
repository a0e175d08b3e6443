"""The up-front GPU check: FLUX.1 on a GPU it cannot run on is refused with the reason and the options
(the planner's choices per GPU: tests/test_memory_plan.py)."""

from __future__ import annotations

import pytest

from nbkit.errors import NbkitError
from nbkit.models.memory import DeviceFacts, plan_memory, quantizers_installed
from nbkit.models.registry import get_model

T4 = DeviceFacts("Tesla T4", 15.0, bf16=False)
L4 = DeviceFacts("NVIDIA L4", 22.5, bf16=True)
A100_40 = DeviceFacts("NVIDIA A100-SXM4-40GB", 39.6, bf16=True)
A100_80 = DeviceFacts("NVIDIA A100-SXM4-80GB", 79.2, bf16=True)


@pytest.mark.parametrize("task", ["generate", "train"])
def test_a_t4_is_refused_for_flux_with_the_reason_and_the_options(task):
    with pytest.raises(NbkitError) as error:
        plan_memory(get_model("flux1-dev"), task, T4, quantizers=("bitsandbytes",))
    message = str(error.value)
    assert "Tesla T4" in message and "no bfloat16" in message and "float16" in message
    assert "L4 or A100" in message and "4bit" in message


def test_cpus_are_not_checked_and_tasks_are_named():
    assert plan_memory("flux", "train", None) is None
    with pytest.raises(ValueError, match="task"):
        plan_memory("flux", "infer", A100_80)


def test_installed_quantizers_are_looked_up():
    assert quantizers_installed(lambda name: object() if name == "torchao" else None) == ("torchao",)
