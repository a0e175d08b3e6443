"""Several ControlNets applied together, each with the sd-webui-controlnet extension's control mode.

`ControlNetStack` is diffusers' `MultiControlNetModel` (so the ControlNet pipelines take a list of
control images, scales and guidance ranges, one per unit) whose units each keep their own control mode:

- 0 "Balanced": the ControlNet's outputs as they are, on both halves of classifier-free guidance.
- 1 "My prompt is more important": its outputs scaled down towards the shallow blocks (diffusers'
  `guess_mode` scales, 0.1 to 1 on a log scale: the extension's 0.825 ** (12 - i)), on both halves.
- 2 "ControlNet is more important": those scales, on the conditional half only (the unconditional
  half gets none), which is what diffusers' `guess_mode` does for a whole pipeline.

Whether the batch holds the two halves of CFG is the pipeline's to say (`do_classifier_free_guidance`),
so the pipeline that runs the stack is bound to it (`guided_by`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

BALANCED, PROMPT, CONTROL = 0, 1, 2


class ControlNetStack(MultiControlNetModel):
    """ControlNets run together, each with its control mode.

    Args:
        controlnets: the `ControlNetModel`s, in unit order.
        control_modes: each one's control mode (0 balanced, 1 my prompt, 2 ControlNet is more important).
    """

    def __init__(self, controlnets: list[Any], control_modes: list[int]):
        super().__init__(controlnets)
        if len(control_modes) != len(controlnets):
            raise ValueError(
                f"{len(controlnets)} ControlNets need as many control modes, got {control_modes}"
            )
        self.control_modes = tuple(control_modes)
        self._pipeline: weakref.ref | None = None

    def guided_by(self, pipeline: Any) -> None:
        """Bind the pipeline that runs this stack (weakly: the stack outlives no request)."""
        self._pipeline = weakref.ref(pipeline)

    def _cfg_halves(self, guess_mode: bool) -> bool:
        pipeline = self._pipeline() if self._pipeline is not None else None
        # With the pipeline's own guess_mode it already runs the ControlNets on the conditional half only.
        return bool(pipeline is not None and pipeline.do_classifier_free_guidance and not guess_mode)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The summed residuals of every ControlNet (the `MultiControlNetModel` signature)."""
        halves = self._cfg_halves(guess_mode)
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for image, scale, net, mode in zip(
            controlnet_cond, conditioning_scale, self.nets, self.control_modes, strict=True
        ):
            unit_down, unit_mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode or mode != BALANCED,
                return_dict=False,
            )
            if mode == CONTROL and halves:
                # diffusers' pipelines put the unconditional half first.
                unit_down = [_conditional_only(residual) for residual in unit_down]
                unit_mid = _conditional_only(unit_mid)
            if down is None:
                down, mid = list(unit_down), unit_mid
            else:
                down = [total + residual for total, residual in zip(down, unit_down, strict=True)]
                mid = mid + unit_mid
        return down, mid


def _conditional_only(residual: torch.Tensor) -> torch.Tensor:
    half = residual.shape[0] // 2
    return torch.cat([torch.zeros_like(residual[:half]), residual[half:]])
