"""Layer 5: the trainer. Runs any stage (engine.stages) the same way through DeepSpeed: distributed start-up
and dedicated teacher ranks, the batch of every micro-step, producers that make a stage's prepared inputs
ahead of the student, the student's engine with its EMA, checkpoints and resume, the log, and the memory
and FLOP planner.
"""
from engine.trainer.loop import Trainer

__all__ = ["Trainer"]
