"""An accuracy estimate without labels: the mean calibrated confidence of each label set's recent answers.

If confidence is calibrated under shift, the mean confidence of a window of answers estimates their
accuracy, and a fall in it is a drift alarm that needs no label: ``tta_estimated_accuracy{label_set}``
over the last ``TTA_ACCURACY_WINDOW`` images of each label set. Label values stay bounded: a stored or
shipped label set's name (``OWNER/NAME`` for a set stored under an API key's name), and ``inline`` for
every request that sends its labels; a deleted label set's series is removed. deploy/prometheus/alerts.yml
alerts on a drop against the past day.
"""

from __future__ import annotations

import threading
from collections import deque

from server.metrics import Metrics
from server.service.label_sets import fingerprint
from server.storage import LabelSet

INLINE = "inline"  # the label value of requests that send their labels instead of naming a label set


def series(label_set: LabelSet | None) -> str:
    """The ``label_set`` label value of a request's label set: two owners' sets of one name are two series."""
    if label_set is None:
        return INLINE
    return f"{label_set.owner}/{label_set.name}" if label_set.owner else label_set.name


class AccuracyEstimate:
    """Sliding windows of calibrated confidences, one per label set, exported as a gauge."""

    def __init__(self, metrics: Metrics, window: int):
        self.metrics = metrics
        self.window = window
        # series -> (the fingerprint of the label set it was filled for, its window)
        self._windows: dict[str, tuple[str, deque[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, label_set: LabelSet | None, confidences: list[float]) -> float:
        """Add a request's confidences to its label set's window; returns the window's mean.

        A label set deleted and created again under its name (through this replica or another sharing the
        database) is another set: its window starts empty rather than mixing the old set's answers in.
        """
        key = series(label_set)
        version = fingerprint(label_set) if label_set is not None else INLINE
        with self._lock:
            kept = self._windows.get(key)
            if kept is None or kept[0] != version:
                kept = self._windows[key] = (version, deque(maxlen=self.window))
            window = kept[1]
            window.extend(confidences)
            mean = sum(window) / len(window)
        self.metrics.estimated_accuracy.labels(label_set=key).set(mean)
        self.metrics.estimated_accuracy_images.labels(label_set=key).set(len(window))
        return mean

    def forget(self, label_set: LabelSet) -> None:
        """Drop a deleted label set's window and its series."""
        key = series(label_set)
        with self._lock:
            if self._windows.pop(key, None) is None:
                return
        for gauge in (self.metrics.estimated_accuracy, self.metrics.estimated_accuracy_images):
            gauge.remove(key)
