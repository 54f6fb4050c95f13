"""Running methods on a subset: in this process through the server's classify service, or against a live
server over HTTP. Both send the same requests (``batch_size`` images each, seeded ``seed + start``) and
read the same results, so their answers agree image for image.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from ttaserve_client import Client

from benchmarks._lib.data import Subset
from server.service import ClassifyRequest, Runtime
from server.settings import Settings

DAY_S = 86_400.0  # the in-process runner's request deadline: a benchmark waits for its answers


@dataclass
class Outputs:
    """A method's answers on a subset."""

    logits: torch.Tensor  # [N, C] the method's final logits
    pred: torch.Tensor  # [N] its labels (ZERO's vote winner need not be the arg-max)
    probs: torch.Tensor  # [N, C] the calibrated probabilities the server returned
    scores: torch.Tensor  # [N, C] each label's own calibrated score
    none_of_these: torch.Tensor  # [N] the probability that no label fits


class Runner(ABC):
    """Runs a method on a subset in requests of ``batch_size`` images, request ``k`` seeded ``seed + start``."""

    batch_size: int
    seed: int
    description: str

    def run(self, subset: Subset, method: str, options: dict[str, Any], progress: tqdm | None = None) -> Outputs:
        index = {name: j for j, name in enumerate(subset.class_names)}
        fields = ("logit", "probability", "score")
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
        preds, none = [], []
        for start in range(0, len(subset.images), self.batch_size):
            images = subset.images[start : start + self.batch_size]
            for result in self.classify(images, subset, method, options, self.seed + start):
                for name in fields:
                    row = torch.zeros(len(subset.class_names))
                    for p in result["predictions"]:  # top_k is every class: each one's values are there
                        row[index[p["label"]]] = p[name]
                    rows[name].append(row)
                preds.append(index[result["predictions"][0]["label"]])
                none.append(result["none_of_these"])
            if progress is not None:
                progress.set_postfix_str(f"{len(preds)}/{len(subset.images)} images")
        logits, probs, scores = (torch.stack(rows[name]) for name in fields)
        return Outputs(logits, torch.tensor(preds), probs, scores, torch.tensor(none))

    @abstractmethod
    def classify(
        self, images: list[Image.Image], subset: Subset, method: str, options: dict[str, Any], seed: int
    ) -> list[dict[str, Any]]:
        """One request's results, as the API's JSON: every class among the predictions."""

    @abstractmethod
    def close(self) -> None: ...


class DirectRunner(Runner):
    """Runs methods in this process through ``server.service``'s classify pipeline, as the HTTP API does.

    The runtime holds a label-set store in a temporary directory and a request deadline of a day;
    everything else is the server's default configuration for the model.
    """

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int, seed: int = 0):
        self._data = tempfile.TemporaryDirectory(prefix="tta-bench-")
        settings = Settings(
            model=model,
            pretrained=pretrained,
            device=device,
            data_dir=self._data.name,
            request_timeout_s=DAY_S,
            _env_file=None,
        )
        self.runtime = Runtime.open(settings)
        engine = self.runtime.engine
        while not engine.ready:
            if engine.load_error is not None:
                raise SystemExit(f"the model could not be loaded: {engine.load_error}")
            time.sleep(0.05)
        self._loop = asyncio.new_event_loop()
        self.batch_size = min(batch_size, settings.max_images_per_request)
        self.seed = seed
        device_name = engine.backbone.device if engine.backbone is not None else settings.device
        self.description = f"{self.runtime.spec.display} (direct, {device_name})"

    def classify(
        self, images: list[Image.Image], subset: Subset, method: str, options: dict[str, Any], seed: int
    ) -> list[dict[str, Any]]:
        by_name = subset.label_set is not None
        request = ClassifyRequest(
            images=images,
            labels=None if by_name else subset.class_names,
            label_set=subset.label_set,
            templates=None if by_name else subset.templates,
            top_k=len(subset.class_names),
            method=method,
            options=options or None,
            seed=seed,
        )
        return self.send(request)

    def send(self, request: ClassifyRequest) -> list[dict[str, Any]]:
        """Any classify request (a video, for one) through the service; its results as the API's JSON."""
        answer = self._loop.run_until_complete(self.runtime.classifier.classify(request))
        return [result.model_dump() for result in answer.results]

    def close(self) -> None:
        self.runtime.close()
        self._loop.close()
        self._data.cleanup()


class ServerRunner(Runner):
    """Runs methods through a TTAServe server's HTTP API, images sent as PNG uploads."""

    def __init__(self, url: str, batch_size: int, seed: int = 0):
        self.client = Client(url, timeout_s=DAY_S)
        model = self.client.models()[0]
        self.batch_size = min(batch_size, self.client.methods().methods[0].limits["max_images_per_request"])
        self.seed = seed
        self.description = f"{model.id} (server {url}, {model.device})"

    def classify(
        self, images: list[Image.Image], subset: Subset, method: str, options: dict[str, Any], seed: int
    ) -> list[dict[str, Any]]:
        payload = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            payload.append(buf.getvalue())
        by_name = subset.label_set is not None
        body = self.client.classify(
            payload,
            labels=None if by_name else subset.class_names,
            label_set=subset.label_set,
            templates=None if by_name else subset.templates,
            top_k=len(subset.class_names),
            method=method,
            options=options or None,
            seed=seed,
        )
        return [result.model_dump() for result in body.results]

    def close(self) -> None:
        self.client.close()
