"""Losses: joint/multi-task, alignment and location losses."""

from .joint import JointLoss
