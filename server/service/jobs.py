"""Training jobs: a few-shot fine-tune asked over the API, checked whole up front, then run off the request path.

``Jobs.finetune`` checks everything a worker would trip on later (the label set, every support label in
it and every label with at least one image, the training config, the name, each image decoded, the
anchor texts) so that a bad request is a 422 now, not a failed job minutes later; it then stores the job
(``queued``) with its inputs and wakes the runner (``server.service.job_runner``), which trains it in a
worker process of its own and publishes the adapter through the registry's checks. Jobs belong to the
API key that asked for them (its name, ``owner``): another key's job is answered as absent.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.fewshot.train import TrainConfig
from server.errors import InvalidInput
from server.service.adapters import check_name
from server.service.decoding import decode_base64, decode_image
from server.service.job_runner import JobRunner
from server.service.label_sets import LabelSets
from server.service.training import Pair, TrainInputs, TrainPlan
from server.service.validation import check_text, resolve_templates
from server.settings import Settings
from server.storage import Store
from server.storage.base import JobRecord


@dataclass(frozen=True)
class FinetuneRequest:
    """``POST /v1/jobs/finetune``, parsed: images are base64 strings (or data: URIs) as the client sent them."""

    label_set: str
    support: Sequence[tuple[str, str]]  # (image, label)
    name: str
    config: Mapping[str, Any]  # the TrainConfig fields given (type, steps, ..., retrieve_k); the rest default
    captions: Sequence[tuple[str, str]] = ()  # (image, caption)
    pool: Sequence[tuple[str, str]] = ()  # (image, text)
    group: str | None = None


def invalid_config(message: str) -> InvalidInput:
    return InvalidInput(f"invalid training config: {message}", code="invalid_train_config")


def train_config(given: Mapping[str, Any], settings: Settings) -> TrainConfig:
    """The TrainConfig of ``given`` (defaults for the rest), within TTA_MAX_TRAIN_STEPS; 422 otherwise."""
    try:
        config = TrainConfig(**given)
    except (TypeError, ValueError) as exc:
        raise invalid_config(str(exc)) from None
    if config.steps > settings.max_train_steps:
        raise invalid_config(f"steps is {config.steps}; the limit is {settings.max_train_steps} (TTA_MAX_TRAIN_STEPS)")
    return config


def _decoded(items: Sequence[tuple[str, str]], where: str, settings: Settings) -> list[bytes]:
    """Each base64 image decoded and checked as classify checks it; errors name ``where[i].image``."""
    out = []
    for i, (text, _) in enumerate(items):
        try:
            data = decode_base64(text, i)
            decode_image(data, i, settings.max_image_pixels, settings.max_aspect_ratio)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}[{i}].image: {exc.message}", code=exc.code) from None
        out.append(data)
    return out


def _anchor_texts(items: Sequence[tuple[str, str]], where: str, settings: Settings) -> list[str]:
    texts = []
    for i, (_, text) in enumerate(items):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput(f"{where}[{i}].text is empty: an anchor is an image and its text", code="invalid_anchor")
        check_text(text, f"{where}[{i}].text")
        if len(text) > settings.max_template_chars:
            raise InvalidInput(
                f"{where}[{i}].text has {len(text)} characters; the limit is {settings.max_template_chars} "
                "(TTA_MAX_TEMPLATE_CHARS)",
                code="invalid_anchor",
            )
        texts.append(text.strip())
    return texts


class Jobs:
    """Submitting, reading, listing and cancelling training jobs, each its owner's own."""

    def __init__(self, store: Store, label_sets: LabelSets, runner: JobRunner, settings: Settings):
        self.store = store
        self.label_sets = label_sets
        self.runner = runner
        self.settings = settings

    def finetune(self, request: FinetuneRequest, owner: str) -> JobRecord:
        """Check ``request`` whole and queue it; 422 (or 404 for the label set) for anything a worker would refuse."""
        settings = self.settings
        check_name(request.name)
        if request.group is not None:
            check_name(request.group, "adapter group")
        label_set = self.label_sets.get(request.label_set, owner=owner)
        config = train_config(request.config, settings)
        total = len(request.support) + len(request.captions) + len(request.pool)
        if total > settings.max_train_images:
            raise InvalidInput(
                f"{total} images (support and anchors); the limit is {settings.max_train_images} "
                "(TTA_MAX_TRAIN_IMAGES)",
                code="too_many_images",
            )
        labels = [label for _, label in request.support]
        unknown = sorted({label for label in labels if label not in label_set.labels})
        if unknown:
            raise InvalidInput(
                f"support labels not in label set {label_set.name!r}: {', '.join(map(repr, unknown[:5]))}",
                code="unknown_label",
            )
        shots = Counter(labels)
        missing = [label for label in label_set.labels if shots[label] == 0]
        if missing:
            raise InvalidInput(
                f"{len(missing)} of the {len(label_set.labels)} labels of {label_set.name!r} have no support image "
                f"({', '.join(map(repr, missing[:5]))}): give at least one image of each label",
                code="too_few_images",
            )
        support = _decoded(request.support, "support", settings)
        captions = _decoded(request.captions, "anchors.captions", settings)
        pool = _decoded(request.pool, "anchors.pool", settings)
        caption_texts = _anchor_texts(request.captions, "anchors.captions", settings)
        pool_texts = _anchor_texts(request.pool, "anchors.pool", settings)
        inputs = TrainInputs(
            support=tuple(Pair(d, label) for d, label in zip(support, labels, strict=True)),
            captions=tuple(Pair(d, t) for d, t in zip(captions, caption_texts, strict=True)),
            pool=tuple(Pair(d, t) for d, t in zip(pool, pool_texts, strict=True)),
        )
        templates = resolve_templates(None, settings, fallback=label_set.templates)
        plan = TrainPlan(label_set.labels, templates, config)
        spec = {
            "label_set": label_set.name,
            "name": request.name,
            "group": request.group,
            **plan.to_dict(),
            "shots": {label: shots[label] for label in label_set.labels},
            "caption_anchors": len(inputs.captions),
            "pool_anchors": len(inputs.pool),
        }
        job = JobRecord(id=uuid.uuid4().hex, kind="finetune", state="queued", spec=spec, owner=owner)
        self.store.create_job(job, inputs.to_bytes())
        self.runner.wake()
        return job

    def get(self, job_id: str, owner: str) -> JobRecord:
        return self.store.job(job_id, owner)

    def list(self, owner: str) -> list[JobRecord]:
        return self.store.list_jobs(owner)

    def cancel(self, job_id: str, owner: str) -> JobRecord:
        """Cancel a queued or running job (its worker is stopped; nothing is published); 409 for a finished one."""
        return self.runner.cancel(job_id, owner)
