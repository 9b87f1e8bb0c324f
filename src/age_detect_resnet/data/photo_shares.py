"""The photo augmentation's optional parts, each given as the share of training faces it is applied to
(`--occlusion`, `--low-resolution`, `--greyscale`, `--tight-cut`, `--yaw`): one owner for their names,
defaults and checks, read by the training config (which does not import torch) and by
`dataset.train_transform`. A new part is a field here, a field of the config's data section with the same
name, and its transform."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# The shares on by default: faces shown at a lower resolution, and in greyscale.
LOW_RESOLUTION_SHARE = 0.25
GREYSCALE_SHARE = 0.1


@dataclass(frozen=True)
class PhotoShares:
    occlusion: float = 0.0  # a random patch hidden, as a hand or a cup hides part of a face
    low_resolution: float = LOW_RESOLUTION_SHARE  # shrunk and scaled back, as small faces look
    greyscale: float = GREYSCALE_SHARE  # in shades of grey, as old prints and scans are
    tight_cut: float = 0.0  # shown as if the photo were cut close round the face
    yaw: float = 0.0  # as if turned a little about the vertical axis (a perspective warp)

    @classmethod
    def of(cls, settings: Any) -> PhotoShares:
        """The shares held by `settings` (the config's data section) under the same names."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    @staticmethod
    def option(name: str) -> str:
        """The command-line option of a share: tight_cut -> tight-cut."""
        return name.replace("_", "-")

    def changed(self) -> list[str]:
        """The names of the shares not at their default: settings only the photo augmentation reads."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]

    def unused_by(self, augment: str) -> str | None:
        """Why these shares do not suit augmentation `augment` (a share changed, yet the augmentation is
        not `photo`, the only one that reads them), or None where they do."""
        changed = self.changed()
        if not changed or augment == "photo":
            return None
        option = self.option(changed[0])
        return f"--{option} is part of the photo augmentation: add --augment photo (not {augment})"

    def out_of_range(self) -> list[tuple[str, float]]:
        """(name, share) for every share outside [0, 1]."""
        return [(f.name, getattr(self, f.name)) for f in fields(self) if not 0 <= getattr(self, f.name) <= 1]


DEFAULT_SHARES = PhotoShares()  # the photo augmentation as `--augment photo` alone gives it
