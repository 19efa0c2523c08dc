"""A diffusers model whose folder holds only its config.json (it has no weights).

`ModelMixin.save_pretrained` writes no weights file for a module without parameters, and
`ModelMixin.from_pretrained` then refuses the folder. TRIP has two such components an
exported pipeline must still name and load: the linear / no fusion of the ablations and
the lossless codec. They load from their config alone. An empty, unsaved buffer gives them the `device` and
`dtype` diffusers asks every pipeline component for (its lookup fails on a module without
parameters or buffers).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin


class ConfigOnlyModel(ModelMixin, ConfigMixin):
    config_name = "config.json"

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_placement", torch.empty(0), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None,
                        **kwargs: Any) -> ConfigOnlyModel:
        """Build from `<path>[/subfolder]/config.json`; weight-loading options do not apply."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder=subfolder))
