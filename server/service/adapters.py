"""The adapter registry: versioned few-shot adapters per owner, checked against the served model, loaded on use.

An adapter is uploaded as its artifact (one safetensors file with its card, ``adapters.fewshot.artifact``)
or made by a training job or a merge; each is kept in the store as the next version of its name for its
owner (the caller's API key name). A request names one as ``name`` (the newest version) or ``name@vN``.
An artifact made for another base model is refused (409 ``adapter_base_model``, naming both
fingerprints), at upload and at use. Loaded adapters stay in the engine's LRU (``TTA_ADAPTER_CACHE_BYTES``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from adapters import Method
from adapters.fewshot.artifact import Adapter, ArtifactError, WrongBaseModel
from adapters.fewshot.merging import MergeError, merge
from server.engine import Engine
from server.engine.resident import Resident
from server.engine.work import AdapterUse
from server.errors import Conflict, InvalidInput, NotFound, NotReady
from server.settings import Settings
from server.storage import Store
from server.storage.base import AdapterRecord

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ROUTED = 64  # candidates one routed request compares each image with
REF = re.compile(r"^(?P<name>[^@]+?)(?:@v(?P<version>[0-9]{1,9}))?$")


def check_name(name: str, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidInput(
            f"{what} {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            code="invalid_name",
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` (the newest version) or ``name@vN`` -> (name, N or None); InvalidInput otherwise."""
    match = REF.match(ref) if isinstance(ref, str) else None
    if match is None:
        raise InvalidInput(f"adapter {ref!r} must be NAME or NAME@vN", code="invalid_adapter_ref")
    return check_name(match["name"]), int(match["version"]) if match["version"] else None


def wrong_base(exc: WrongBaseModel) -> Conflict:
    return Conflict(str(exc), code="adapter_base_model")


@dataclass(frozen=True)
class AdapterChoice:
    """What a classify request asks of adapters: one by name (``ref``), or routing (``ref`` None)."""

    ref: str | None = None
    alpha: float | str | None = 1.0  # a number, or "class_distance" (APEX's rule); None: the default, 1
    top_k: int | None = None  # routing: experts per image
    min_sim: float = 0.0
    group: str | None = None  # routing: among this group's adapters only


@dataclass(frozen=True)
class Loaded:
    """An adapter a request uses: its record and the loaded adapter on the device."""

    record: AdapterRecord
    resident: Resident

    @property
    def adapter(self) -> Adapter:
        return self.resident.adapter


class AdapterRegistry:
    """Adding, listing, reading, deleting and loading adapters, each the owner's own."""

    def __init__(self, store: Store, engine: Engine, settings: Settings):
        self.store = store
        self.engine = engine
        self.settings = settings

    def _fingerprint(self) -> str:
        backbone = self.engine.backbone
        if backbone is None or not backbone.fingerprint:
            raise NotReady(
                "the model is still loading: adapters are checked against it; retry shortly", retry_after_s=1
            )
        return backbone.fingerprint

    def parse(self, data: bytes) -> Adapter:
        """Read and check an artifact against the served model: 422 ``invalid_adapter`` or 409 (an upload is
        capped by TTA_MAX_BODY_BYTES before it gets here)."""
        return checked_artifact(data, self._fingerprint())

    def add(
        self, data: bytes, name: str, *, owner: str, group: str | None = None, source: str = "upload"
    ) -> AdapterRecord:
        """Keep ``data`` (an artifact) as the next version of ``name``."""
        check_name(name)
        if group is not None:
            check_name(group, "adapter group")
        return publish(self.store, data, name, self._fingerprint(), owner=owner, group=group, source=source)

    def list(self, owner: str) -> list[AdapterRecord]:
        return self.store.list_adapters(owner)

    def get(self, ref: str, owner: str) -> AdapterRecord:
        name, version = parse_ref(ref)
        return self.store.adapter(name, version, owner)

    def artifact(self, ref: str, owner: str) -> tuple[AdapterRecord, bytes]:
        record = self.get(ref, owner)
        return record, self.store.adapter_bytes(record.name, record.version, owner)

    def delete(self, ref: str, owner: str) -> int:
        name, version = parse_ref(ref)
        return self.store.delete_adapter(name, version, owner)

    def resident(self) -> dict[str, int]:
        """sha256 -> bytes of the adapters loaded now."""
        return self.engine.adapters.resident()

    def load(self, ref: str, owner: str) -> Loaded:
        """The adapter ``ref`` names for ``owner``, loaded (from the LRU, or read from the store and parsed)."""
        return self._loaded(self.get(ref, owner), owner)

    def _loaded(self, record: AdapterRecord, owner: str) -> Loaded:
        """``record``'s adapter, loaded: from the LRU, or its bytes read from the store and parsed."""
        fingerprint = self._fingerprint()
        if record.card.get("base_model") != fingerprint:  # checked before reading the bytes
            raise wrong_base(WrongBaseModel(str(record.card.get("base_model")), fingerprint))

        def read() -> Adapter:
            data = self.store.adapter_bytes(record.name, record.version, owner)
            return self.parse(data)

        return Loaded(record, self.engine.adapters.get(record.sha256, read))

    def use(self, choice: AdapterChoice, owner: str, method: Method[Any]) -> AdapterUse:
        """The adapter(s) a classify request is served through, loaded; 4xx for what cannot be served."""
        if choice.ref is None and choice.top_k is None:
            raise InvalidInput("adapter_alpha needs an adapter", code="adapter_alpha_without_adapter")
        by_distance = choice.alpha == "class_distance"
        if by_distance and (choice.ref is None or method.name != "zero_shot"):
            raise InvalidInput(
                'adapter_alpha "class_distance" (APEX\'s per-class weight) serves one named adapter with zero_shot; '
                "give a number to adapt on top of the adapter or to route",
                code="adapter_method",
            )
        alpha = 1.0 if not isinstance(choice.alpha, float | int) else float(choice.alpha)
        if choice.ref is not None:
            one = self.load(choice.ref, owner)
            check_method(method, one.adapter)
            return AdapterUse((one.resident,), (one.record.ref,), alpha, class_distance=by_distance)
        if method.name != "zero_shot":
            raise InvalidInput(
                f"routing answers with the mean of the routed adapters' and the frozen model's logits; {method.name!r} "
                "cannot adapt on top of several adapters at once: name one adapter to adapt on top of it",
                code="adapter_method",
            )
        if choice.group is not None:
            check_name(choice.group, "adapter group")
        newest: dict[str, AdapterRecord] = {}
        for record in self.list(owner):  # by name, then version: the last of each name is its newest
            if choice.group is None or record.group == choice.group:
                newest[record.name] = record
        fingerprint = self._fingerprint()
        candidates = [r for r in newest.values() if r.card.get("base_model") == fingerprint]
        if len(candidates) > MAX_ROUTED:
            raise InvalidInput(
                f"routing would compare each image with {len(candidates)} adapters, over {MAX_ROUTED}: "
                "name an adapter group (adapter.group)",
                code="too_many_adapters",
            )
        loaded = [self._loaded(r, owner) for r in candidates]  # the records just listed: no read each
        return AdapterUse(
            tuple(x.resident for x in loaded),
            tuple(x.record.ref for x in loaded),
            alpha,
            top_k=choice.top_k,
            min_sim=choice.min_sim,
        )

    def merge_group(
        self,
        group: str,
        method: str,
        *,
        owner: str,
        name: str | None = None,
        scale: float | None = None,
        density: float | None = None,
    ) -> MergeOutcome:
        """Merge the newest version of every adapter of ``group`` (from the originals) and keep the result as the
        next version of ``name`` (default ``GROUP.merged``); with EMR, each member's reconstruction too, as the next
        version of ``GROUP.MEMBER``. CPU work on the stored artifacts: call it off the event loop."""
        check_name(group, "adapter group")
        name = check_name(name) if name is not None else f"{group}.merged"
        newest: dict[str, AdapterRecord] = {}
        for record in self.list(owner):
            if record.group == group:
                newest[record.name] = record
        if not newest:
            raise NotFound(
                f"no adapter is in group {group!r}; upload or train adapters with group={group!r}",
                code="unknown_adapter_group",
            )
        members = [self.parse(self.store.adapter_bytes(r.name, r.version, owner)) for r in newest.values()]
        refs = [r.ref for r in newest.values()]
        try:
            merged = merge(members, method, scale=scale, density=density, names=refs)
        except MergeError as exc:
            raise InvalidInput(str(exc), code="merge_refused") from None
        source = f"merge:{group}"
        unified = self.add(merged.unified.to_bytes(), name, owner=owner, source=source)
        outcomes = []
        for record, member in zip(newest.values(), merged.members, strict=True):
            rebuilt = None
            if method == "emr":
                rebuilt = self.add(
                    member.reconstruction.to_bytes(), check_name(f"{group}.{record.name}"), owner=owner, source=source
                )
            outcomes.append(
                MemberOutcome(record.ref, rebuilt.ref if rebuilt else None, member.fidelity, member.mask_density,
                              member.rescaler)
            )  # fmt: skip
        return MergeOutcome(method, unified, tuple(outcomes))


@dataclass(frozen=True)
class MemberOutcome:
    adapter: str  # the member, NAME@vN
    reconstruction: str | None  # EMR: the stored reconstruction, NAME@vN; otherwise the unified serves it
    fidelity: float  # cosine of what serves it now with its own updates
    mask_density: float
    rescaler: float


@dataclass(frozen=True)
class MergeOutcome:
    method: str
    unified: AdapterRecord
    members: tuple[MemberOutcome, ...]


def checked_artifact(data: bytes, fingerprint: str) -> Adapter:
    """``data`` read as an artifact made for the model with ``fingerprint``: 422 ``invalid_adapter``, or 409
    ``adapter_base_model`` naming both fingerprints."""
    try:
        adapter = Adapter.from_bytes(data)
        adapter.check_base(fingerprint)
    except ArtifactError as exc:
        raise InvalidInput(f"not a usable adapter artifact: {exc}", code="invalid_adapter") from None
    except WrongBaseModel as exc:
        raise wrong_base(exc) from None
    return adapter


def publish(
    store: Store, data: bytes, name: str, fingerprint: str, *, owner: str, group: str | None, source: str
) -> AdapterRecord:
    """Check ``data`` as an upload is checked and keep it as the next version of ``name``: the record and its
    bytes in one store call. The registry's uploads and the training worker (another process) both publish here."""
    check_name(name)
    if group is not None:
        check_name(group, "adapter group")
    adapter = checked_artifact(data, fingerprint)
    record = AdapterRecord(
        name=name,
        version=0,
        card=_card(adapter),
        sha256=hashlib.sha256(data).hexdigest(),
        nbytes=len(data),
        group=group,
        source=source,
        owner=owner,
    )
    return store.add_adapter(record, data)


def check_method(method: Method[Any], adapter: Adapter) -> None:
    """Refuse a test-time method that would bypass the adapter: prompt tuning (TPT, C-TPT) on a text adapter (its
    map of the class features would be skipped; on a prompt part it starts from the learned context, as the TPT
    paper's CoOp + TPT), or a method running the vision tower with its own LoRA (TTL) on a lora part."""
    parts = set(adapter.card.parts)
    if method.adapts_text and "text_adapter" in parts:
        raise InvalidInput(
            f"{method.name!r} re-encodes the class text with a context of its own, which would bypass this adapter's "
            "text adapter; use zero_shot, mta, zero or tps on top of it (prompt tuning continues from prompt and "
            "lora adapters)",
            code="adapter_method",
        )
    if method.adapts_vision_tower and "lora" in parts:
        raise InvalidInput(
            f"{method.name!r} runs the vision tower with LoRA of its own, which would bypass this adapter's lora part; "
            "use zero_shot, mta, zero or tps on top of it",
            code="adapter_method",
        )


def _card(adapter: Adapter) -> dict[str, Any]:
    card = adapter.card
    return {
        "type": card.type,
        "parts": list(card.parts),
        "base_model": card.base_model,
        "labels": list(card.labels),
        "ctx_init": card.ctx_init,
        "training": card.training,
        "metrics": card.metrics,
        "created_at": card.created_at,
    }
