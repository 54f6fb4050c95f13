"""The bodies of ``/v1/jobs``: a fine-tune request and a job as the API shows it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.storage.base import JobRecord


class SupportImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="Base64 string or data: URI.")
    label: str = Field(..., description="Its label: one of the label set's.")


class AnchorPair(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., description="Base64 string or data: URI.")
    text: str = Field(..., description="A caption of the image.")


class AnchorsIn(BaseModel):
    """ARF's anchors: they keep the adapter close to the frozen model on what is not in the support set."""

    model_config = ConfigDict(extra="forbid")

    captions: list[AnchorPair] = Field(default_factory=list, description="Your captions of your images: all used.")
    pool: list[AnchorPair] = Field(
        default_factory=list, description="Image-text pairs to retrieve from: each support image's nearest are used."
    )
    retrieve_k: int | None = Field(None, description="Pool pairs retrieved per support image (default 4).")


class FinetuneIn(BaseModel):
    """``POST /v1/jobs/finetune``: train a few-shot adapter for a label set's classes on labelled images."""

    model_config = ConfigDict(extra="forbid")

    label_set: str = Field(..., description="A stored or shipped label set: its labels are the classes.")
    support: list[SupportImage] = Field(..., description="Labelled images: at least one of each label.")
    name: str = Field(..., description="The adapter to publish: the next version of this name.")
    group: str | None = Field(None, description="An adapter group to publish it in (routing, merging).")
    type: Literal["apex", "prompt", "lora"] = Field(
        "apex", description="apex: a text adapter and visual LoRA; prompt: a learned context; lora: visual LoRA."
    )
    steps: int | None = Field(None, description="Optimisation steps (default 150, at most TTA_MAX_TRAIN_STEPS).")
    lr: float | None = Field(None, description="AdamW learning rate, cosine-decayed (default 0.002).")
    batch_size: int | None = Field(None, description="Support images per step (default 32).")
    seed: int | None = Field(None, description="The same inputs and seed give the same adapter (default 0).")
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_blocks: int | None = Field(None, description="LoRA on the last this many vision blocks (default 3).")
    ctx_init: str | None = Field(None, description="The prompt type's starting context (default 'a photo of a').")
    label_smoothing: float | None = None
    tca_weight: float | None = Field(None, description="Weight of the caption anchors' loss (default 1).")
    ita_weight: float | None = Field(None, description="Weight of the retrieved anchors' loss (default 1).")
    anchors: AnchorsIn | None = None

    def config(self) -> dict[str, Any]:
        """The training config fields given (the rest default)."""
        fields = self.model_dump(exclude={"label_set", "support", "name", "group", "anchors"}, exclude_none=True)
        if self.anchors is not None and self.anchors.retrieve_k is not None:
            fields["retrieve_k"] = self.anchors.retrieve_k
        return fields


class JobOut(BaseModel):
    """A job: what it was asked, where it is, what it made."""

    id: str
    kind: str = Field(..., description="finetune.")
    state: str = Field(..., description="queued, running, succeeded, failed or cancelled.")
    stage: str | None = Field(None, description="While running: loading the model, training, publishing.")
    step: int | None = Field(None, description="Steps done.")
    steps: int | None = None
    loss: float | None = Field(None, description="The loss of the last step reported.")
    elapsed_s: float | None = Field(None, description="Seconds of training so far.")
    eta_s: float | None = Field(None, description="Estimated seconds of training left.")
    pid: int | None = Field(None, description="The worker process's id while it runs (on the server's machine).")
    result: dict[str, Any] | None = Field(None, description='What it made: {"adapter": "NAME@vN", "metrics"}.')
    error: str | None = Field(None, description="Why it failed.")
    spec: dict[str, Any] = Field(..., description="The request without its images, its config in full.")
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, job: JobRecord) -> JobOut:
        p = job.progress
        return cls(
            id=job.id,
            kind=job.kind,
            state=job.state,
            stage=p.get("stage"),
            step=p.get("step"),
            steps=p.get("steps"),
            loss=p.get("loss"),
            elapsed_s=p.get("elapsed_s"),
            eta_s=p.get("eta_s"),
            pid=p.get("pid") if job.state == "running" else None,
            result=job.result,
            error=job.error,
            spec=job.spec,
            created_at=job.created_at,
            updated_at=job.updated_at,
        )


class JobList(BaseModel):
    jobs: list[JobOut] = Field(..., description="Your jobs, oldest first.")
