"""What the reports group methods by and the cost model reads: a method's family, locking and parallelism.

Plain names (no torch), declared as class attributes of a method's ``Stage`` (see ALGORITHMS.md).
"""
from __future__ import annotations

# Families of methods (ALGORITHMS.md), what the report groups and compares by.
EXACT_GRADIENT = "exact gradient"
DELAYED_GRADIENT = "delayed gradient"
SYNTHETIC_GRADIENT = "synthetic gradient"
FEEDBACK_ALIGNMENT = "feedback alignment"
LOCAL_LOSS = "local loss"

# How the modules of one iteration wait for each other, for the ideal period of the cost model:
LOCKED = "locked"  # forward and backward run through the modules one after another (BP)
FORWARD_LOCKED = "forward locked"  # forwards in turn, then every module's backward at once (DFA)
UNLOCKED = "unlocked"  # every module works at once on its own part of a different batch (DDG, FR)
LOCKINGS = (LOCKED, FORWARD_LOCKED, UNLOCKED)

# How a method uses the K devices: a module of the model on each (everything but DDP), or a whole replica on each.
MODEL_PARALLEL = "model"
DATA_PARALLEL = "data"
