"""Losses: joint/multi-task, alignment and location losses."""

from .alignment import MultiStageAlignmentLoss, SegAlignLoss
from .joint import JointLoss
