"""Losses: joint/multi-task, alignment and location losses."""

from .alignment import MultiStageAlignmentLoss, SegAlignLoss
from .location import LocationAwareLoss
from .joint import JointLoss
