"""Format, augmentations, targets and schedules: the package's pure core."""

from wds_reinforce.core.version import require_torchvision

# Before anything imports torchvision: a torch and torchvision that do not match say so in one line.
require_torchvision()
