"""The up-front GPU check: FLUX.1 on a GPU it cannot run on is refused with the reason and the options."""

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


def test_the_largest_option_that_fits_is_chosen():
    dev = get_model("flux1-dev")
    assert plan_memory(dev, "generate", A100_80, quantizers=()).name == "bf16"
    assert plan_memory(dev, "generate", A100_40, quantizers=()).name == "bf16"
    assert (
        plan_memory(dev, "generate", DeviceFacts("NVIDIA A10G", 30.0, True), quantizers=()).name
        == "bf16-offload"
    )
    assert plan_memory(dev, "train", A100_40, quantizers=()).name == "bf16"
    assert (
        plan_memory(dev, "train", DeviceFacts("NVIDIA A10G", 30.0, True), quantizers=("bitsandbytes",)).name
        == "8bit"
    )
    assert plan_memory(dev, "train", L4, quantizers=("bitsandbytes",)).name == "4bit"
    assert plan_memory(dev, "generate", L4, quantizers=("torchao",)).name == "8bit-offload"


def test_too_little_memory_without_a_quantizer_names_the_install():
    with pytest.raises(NbkitError) as error:
        plan_memory(
            get_model("flux1-schnell"), "train", DeviceFacts("NVIDIA A10G", 22.0, True), quantizers=()
        )
    message = str(error.value)
    assert "NVIDIA A10G has 22 GiB" in message and "pip install bitsandbytes" in message


def test_sd_families_and_cpus_are_not_checked():
    assert plan_memory(get_model("sdxl"), "train", T4, quantizers=()) is None
    assert plan_memory("flux", "train", None) is None
    with pytest.raises(ValueError, match="task"):
        plan_memory("flux", "infer", A100_80)


def test_installed_quantizers_are_looked_up():
    assert quantizers_installed(lambda name: object() if name == "torchao" else None) == ("torchao",)


def test_a_quantized_way_is_picked_only_when_a_library_does_its_bits():
    dev = get_model("flux1-dev")
    # torchao does 8-bit only: an L4 trains FLUX.1 in 4 bits, which needs bitsandbytes.
    with pytest.raises(NbkitError) as error:
        plan_memory(dev, "train", L4, quantizers=("torchao",))
    message = str(error.value)
    assert "NVIDIA L4" in message and "4bit way" in message and "need bitsandbytes" in message
    assert "installed: torchao" in message and "pip install bitsandbytes" in message
    # A 16 GB card generates in 4 bits with bitsandbytes; torchao alone leaves it without a way.
    card = DeviceFacts("NVIDIA RTX A4000", 15.7, True)
    assert plan_memory(dev, "generate", card, quantizers=("bitsandbytes",)).name == "4bit-offload"
    assert plan_memory(dev, "generate", card, quantizers=("torchao", "bitsandbytes")).name == "4bit-offload"
    with pytest.raises(NbkitError, match=r"4bit-offload way.*need bitsandbytes"):
        plan_memory(dev, "generate", card, quantizers=("torchao",))
    # 8-bit: either library.
    a10g = DeviceFacts("NVIDIA A10G", 30.0, True)
    assert plan_memory(dev, "train", a10g, quantizers=("torchao",)).name == "8bit"
    with pytest.raises(NbkitError, match=r"8bit way.*bitsandbytes or torchao"):
        plan_memory(dev, "train", a10g, quantizers=("quanto",))
