"""The engine: the only code that touches the device.

``Engine`` loads the backbone and runs ``Work`` on two ``Lane`` instances (zero-shot and adaptation);
``Runner`` is what a lane runs, thread-free (stacking, the confidence gate, the zero-shot fallback);
``admission`` prices work in seconds and bytes; ``adaptation`` is the per-image pipeline of a method
(views, one encoder pass, stacked steps); ``classes`` builds and caches class text features.
"""

from server.engine.classes import ClassText
from server.engine.engine import Engine
from server.engine.work import Demand, ImageReport, JobOutput, Work

__all__ = ["ClassText", "Demand", "Engine", "ImageReport", "JobOutput", "Work"]
