"""The transport-free service layer: the classify pipeline and its siblings (calibration, label sets,
discovery), and the ``Runtime`` that holds one process's engine, store and services."""

from server.service.classify import ClassifyRequest, ClassifyService
from server.service.results import Classification, Result
from server.service.runtime import Runtime, check_settings

__all__ = ["Classification", "ClassifyRequest", "ClassifyService", "Result", "Runtime", "check_settings"]
