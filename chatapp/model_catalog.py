"""Providers and models: seeded from the environment, discovered from each provider's model list,
merged with the catalog (chatapp/providers/kimi_catalog.json), then managed by staff in the admin.

- Seeding creates what is missing and updates the facts it owns; it never undoes a staff decision:
  every field staff changed in the admin is recorded in `ModelConfig.staff_overrides` and never
  written by a sync (enabled, display name, prices, limits, vision, contract, ...).
- Discovery: `GET {base}/models` on Moonshot and OpenAI-compatible servers, at start and from the
  admin's "Refresh models". A listed model whose family the catalog knows is offered with that
  family's facts; an unknown one is added disabled (staff enable it). A model that was listed
  and is no longer, or that answers 404, becomes unavailable (hidden from pickers) with its
  successor. Workers AI has no list: the catalog says what it serves.
- The order of the picker comes from the catalog's family ranks (K3 above K2.6 above K2.7 Code).
"""

import logging
import threading
from dataclasses import dataclass, field

import httpx
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import teams
from .models import AuditEntry, Message, ModelConfig, Provider
from .providers import catalog
from .providers.catalog import ModelFacts, parse_model_list

log = logging.getLogger(__name__)

DEMO_PROVIDER = "Demo"
DEMO_MODEL_ID = "demo"
DEMO_SORT_ORDER = 100_000  # listed last once a real provider exists
UNKNOWN_RANK_ORDER = 10_000  # models the catalog does not know come after every known one
PROVIDER_ORDER = {"moonshot": 0, "workers_ai": 1, "openai_compat": 2}
DISCOVERY_TIMEOUT = 8.0
DISCOVERING_KINDS = (Provider.Kind.MOONSHOT, Provider.Kind.OPENAI_COMPAT)
GONE_404 = "The provider answered 404 (model not found)."

# Fields a sync may write; any of them that staff changed stays as staff left it.
FACT_FIELDS = (
    "display_name",
    "description",
    "family",
    "context_window",
    "max_output_tokens",
    "max_output_limit",
    "vision",
    "video",
    "reasoning",
    "contract",
    "price_input",
    "price_cached_input",
    "price_output",
    "price_batch_input",
    "price_batch_output",
    "status",
    "status_date",
    "status_note",
    "successor",
    "sort_order",
    "enabled",
)
# What staff can change in the admin and is recorded as their decision.
STAFF_FIELDS = FACT_FIELDS + ("max_image_edge", "model_id")

_synced = False
_sync_lock = threading.Lock()


@dataclass
class SyncReport:
    """What a sync did, for the admin's message and the log."""

    added: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # providers whose list failed

    def summary(self) -> str:
        parts = []
        if self.added:
            parts.append("new: " + ", ".join(self.added))
        if self.unavailable:
            parts.append("now unavailable: " + ", ".join(self.unavailable))
        if self.unreachable:
            parts.append("model list not readable: " + ", ".join(self.unreachable))
        return "; ".join(parts) or "no change"


# ---- facts -> fields -------------------------------------------------------------------------


def sort_order_for(kind: str, facts: ModelFacts | None) -> int:
    rank = facts.rank if facts else 0
    base = (1000 - rank) * 10 if facts else UNKNOWN_RANK_ORDER
    return base + PROVIDER_ORDER.get(kind, 3)


def fields_from_facts(kind: str, model_id: str, facts: ModelFacts | None) -> dict:
    """The catalog's values for a model's fact fields (lifecycle excluded)."""
    if facts is None:
        return {
            "display_name": model_id,
            "family": "",
            "contract": dict(catalog.PLAIN_CONTRACT),
            "sort_order": sort_order_for(kind, None),
        }
    return {
        "display_name": facts.display_name,
        "description": facts.description,
        "family": facts.family,
        "context_window": facts.context_window,
        "max_output_tokens": facts.default_output,
        "max_output_limit": facts.max_output,
        "vision": facts.vision,
        "video": facts.video,
        "reasoning": facts.reasoning,
        "contract": facts.contract,
        "price_input": facts.price_input,
        "price_cached_input": facts.price_cached_input,
        "price_output": facts.price_output,
        "price_batch_input": facts.price_batch_input,
        "price_batch_output": facts.price_batch_output,
        "sort_order": sort_order_for(kind, facts),
    }


def lifecycle_from_facts(facts: ModelFacts | None) -> dict:
    if facts is None or facts.status == "available":
        return {"status": ModelConfig.Status.AVAILABLE, "status_date": None, "status_note": ""}
    when = f" on {facts.status_date.isoformat()}" if facts.status_date else ""
    if facts.status == "retired":
        return {
            "status": ModelConfig.Status.UNAVAILABLE,
            "status_date": facts.status_date,
            "status_note": f"Retired by the provider{when}.",
            "successor": facts.successor,
        }
    return {
        "status": ModelConfig.Status.DEPRECATED,
        "status_date": facts.status_date,
        "status_note": f"Deprecated by the provider{when}.",
        "successor": facts.successor,
    }


def model_apply(model: ModelConfig, values: dict) -> list[str]:
    """Set every value whose field staff did not change; -> the fields that changed."""
    kept = set(model.staff_overrides or ())
    changed = []
    for name, value in values.items():
        if name in kept or getattr(model, name) == value:
            continue
        setattr(model, name, value)
        changed.append(name)
    return changed


def model_fill_from_catalog(model: ModelConfig) -> None:
    """A model staff add in the admin gets the catalog's facts for every field they left as is
    (the admin records what they did set in staff_overrides first)."""
    facts = catalog.lookup(model.provider.kind, model.model_id)
    values = fields_from_facts(model.provider.kind, model.model_id, facts)
    if facts is not None:
        values.update(lifecycle_from_facts(facts))
    values.pop("enabled", None)
    model_apply(model, values)


# ---- discovery -------------------------------------------------------------------------------


def provider_list_models(provider: Provider) -> list[str] | None:
    """The ids in `GET {base}/models` (OpenAI shape: {"data": [{"id": ...}]}), or None when the
    list cannot be read (no such endpoint, an error, the network)."""
    if provider.kind not in DISCOVERING_KINDS or not provider.base_url:
        return None
    headers = {"Accept": "application/json"}
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    url = provider.base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=DISCOVERY_TIMEOUT)
    except httpx.HTTPError as exc:
        log.warning("model list of %s not readable: %r", provider.name, exc)
        return None
    if response.status_code != 200:
        log.warning("model list of %s answered %s", provider.name, response.status_code)
        return None
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    if not isinstance(data, list):
        log.warning("model list of %s is not an OpenAI model list", provider.name)
        return None
    ids = [
        item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]
    return ids


# ---- sync ------------------------------------------------------------------------------------


def _upsert_provider(
    *, name: str, kind: str, base_url: str, api_key: str, max_concurrency: int
) -> Provider:
    defaults = {
        "kind": kind,
        "base_url": base_url,
        "api_key": api_key,
        "enabled": True,
        "managed_by_env": True,
    }
    if max_concurrency:  # unset in the environment = whatever staff set in the admin
        defaults["max_concurrency"] = max_concurrency
    existing = Provider.objects.filter(name=name).first()
    if existing is not None and not existing.enabled and provider_disabled_by_staff(existing):
        defaults.pop("enabled")  # staff switched it off in the admin: it stays off
    provider, _ = Provider.objects.update_or_create(name=name, defaults=defaults)
    return provider


def provider_disabled_by_staff(provider: Provider) -> bool:
    """Whether the provider's last change of `enabled` was staff unticking it in the admin (the
    audit log records every admin change, before -> after); seeding's own switch-off when
    its variables are removed is not a staff decision."""
    entries = AuditEntry.objects.filter(
        object_type=provider._meta.label_lower, object_id=str(provider.pk)
    ).only("changes")
    for entry in entries.order_by("-created_at", "-id")[:50]:
        change = (entry.changes or {}).get("enabled")
        if isinstance(change, list) and len(change) == 2:
            return change[1] is False
    return False


def workers_ai_base_url() -> str:
    """`{CLOUDFLARE_API_BASE}/accounts/{id}/ai`: the root of /run/{model} and /v1/."""
    base = settings.CLOUDFLARE_API_BASE.rstrip("/")
    return f"{base}/accounts/{settings.CLOUDFLARE_ACCOUNT_ID}/ai"


def _sync_models(
    provider: Provider,
    *,
    offered: list[tuple[str, bool | None, str]],
    discovered: list[str] | None,
    report: SyncReport,
) -> None:
    """offered: (model id, vision from the environment or None, origin). discovered: the
    provider's own list when it was read (None = not read: nothing is marked missing)."""
    kind = provider.kind
    existing = {m.model_id: m for m in provider.models.all()}
    offered_ids = set()
    for model_id, env_vision, origin in offered:
        offered_ids.add(model_id)
        facts = catalog.lookup(kind, model_id)
        values = fields_from_facts(kind, model_id, facts)
        if env_vision is False:
            values["vision"] = False  # the environment's `:text`
        model = existing.get(model_id)
        if model is None:
            model = ModelConfig(provider=provider, model_id=model_id, origin=origin)
            # A model nobody described is offered only once staff enable it (unless the
            # environment named it).
            model.enabled = facts is not None or origin == ModelConfig.Origin.ENVIRONMENT
            model_apply(model, {**values, **lifecycle_from_facts(facts)})
            model.save()
            existing[model_id] = model
            report.added.append(f"{provider.name}: {model.display_name}")
            continue
        values.update(lifecycle_from_facts(facts))
        runtime_gone = (
            model.status == ModelConfig.Status.UNAVAILABLE
            and values["status"] != ModelConfig.Status.UNAVAILABLE
        )
        listed_again = discovered is not None and model_id in discovered
        if runtime_gone and (model.status_note == GONE_404 or not listed_again):
            # Gone from an earlier list: only the list brings it back. Answered 404: lists lag
            # (Moonshot listed kimi-k2.5 after retiring it), so only staff bring it back.
            for name in ("status", "status_date", "status_note", "successor"):
                values.pop(name, None)
        if origin == ModelConfig.Origin.ENVIRONMENT or facts is not None:
            values["enabled"] = True
        changed = model_apply(model, values)
        if changed:
            model.save(update_fields=changed)
    for model_id, model in existing.items():
        if model_id in offered_ids:
            continue
        if model.origin == ModelConfig.Origin.STAFF:
            # Staff added it: their decision, whatever the list shows (some servers list only
            # part of what they serve). A 404 when it is used still marks it (model_gone).
            continue
        if discovered is not None and model_id not in discovered:
            if model_mark_unavailable(model, note=f"No longer in {provider.name}'s model list."):
                report.unavailable.append(f"{provider.name}: {model.display_name}")
        elif model.origin in (ModelConfig.Origin.ENVIRONMENT, ModelConfig.Origin.CATALOG):
            # The environment or the catalog stopped naming it: no longer offered, unless
            # staff decided otherwise.
            changed = model_apply(model, {"enabled": False})
            if changed:
                model.save(update_fields=changed)


def _discover(providers: list[Provider], report: SyncReport) -> dict[int, list[str] | None]:
    found = {}
    for provider in providers:
        if provider.kind in DISCOVERING_KINDS:
            found[provider.pk] = provider_list_models(provider)
            if found[provider.pk] is None:
                report.unreachable.append(provider.name)
    return found


def catalog_sync(*, discover: bool = True) -> SyncReport:
    """Make the providers match the environment, and their models the catalog and the
    providers' own lists, keeping every staff decision."""
    report = SyncReport()
    with transaction.atomic():
        seeded = _seed_providers()
    providers = list(Provider.objects.filter(enabled=True).exclude(kind=Provider.Kind.DEMO))
    # Network first, outside any transaction.
    discovered = _discover(providers, report) if discover else {}
    with transaction.atomic():
        for provider in providers:
            listing = discovered.get(provider.pk)
            offered: list[tuple[str, bool | None, str]] = []
            if provider.kind == Provider.Kind.OPENAI_COMPAT and provider.pk in seeded:
                offered += [
                    (model_id, vision, ModelConfig.Origin.ENVIRONMENT)
                    for model_id, vision in parse_model_list(settings.OPENAI_COMPAT_MODELS)
                ]
            if listing is not None:
                named = {m for m, _, _ in offered}
                offered += [
                    (model_id, None, ModelConfig.Origin.DISCOVERY)
                    for model_id in listing
                    if model_id not in named
                ]
            elif provider.kind in (Provider.Kind.MOONSHOT, Provider.Kind.WORKERS_AI) and (
                provider.pk in seeded
            ):
                # No list to read (Workers AI has none; Moonshot's failed): the catalog's.
                offered += [
                    (model_id, None, ModelConfig.Origin.CATALOG)
                    for model_id in catalog.provider_models(provider.kind)
                ]
            if offered or listing is not None:
                _sync_models(provider, offered=offered, discovered=listing, report=report)
        _seed_demo()
    if report.added or report.unavailable:
        log.info("model catalog: %s", report.summary())
    return report


def _seed_providers() -> set[int]:
    seeded = set()
    if settings.MOONSHOT_API_KEY:
        moonshot = _upsert_provider(
            name="Moonshot",
            kind=Provider.Kind.MOONSHOT,
            base_url=settings.MOONSHOT_BASE_URL,
            api_key=settings.MOONSHOT_API_KEY,
            max_concurrency=settings.MOONSHOT_MAX_CONCURRENCY,
        )
        seeded.add(moonshot.pk)
    if settings.CLOUDFLARE_ACCOUNT_ID and settings.CLOUDFLARE_API_TOKEN:
        workers = _upsert_provider(
            name="Cloudflare Workers AI",
            kind=Provider.Kind.WORKERS_AI,
            base_url=workers_ai_base_url(),
            api_key=settings.CLOUDFLARE_API_TOKEN,
            max_concurrency=settings.CLOUDFLARE_MAX_CONCURRENCY,
        )
        seeded.add(workers.pk)
    if settings.OPENAI_COMPAT_BASE_URL and settings.OPENAI_COMPAT_MODELS:
        compat = _upsert_provider(
            name="OpenAI-compatible",
            kind=Provider.Kind.OPENAI_COMPAT,
            base_url=settings.OPENAI_COMPAT_BASE_URL,
            api_key=settings.OPENAI_COMPAT_API_KEY,
            max_concurrency=settings.OPENAI_COMPAT_MAX_CONCURRENCY,
        )
        seeded.add(compat.pk)
    # A provider whose variables were removed stops being offered (its history stays).
    Provider.objects.filter(managed_by_env=True).exclude(pk__in=seeded).exclude(
        kind=Provider.Kind.DEMO
    ).update(enabled=False)
    return seeded


def _seed_demo() -> None:
    demo, _ = Provider.objects.get_or_create(
        name=DEMO_PROVIDER, defaults={"kind": Provider.Kind.DEMO, "managed_by_env": True}
    )
    model, created = ModelConfig.objects.get_or_create(
        provider=demo,
        model_id=DEMO_MODEL_ID,
        defaults={
            "display_name": "Demo (offline)",
            "description": "A canned reply streamed locally; not a real model.",
            "context_window": 1_000_000,
            "vision": True,
            "sort_order": DEMO_SORT_ORDER,
            "origin": ModelConfig.Origin.CATALOG,
        },
    )
    if not created and model_apply(model, {"sort_order": DEMO_SORT_ORDER}):
        model.save(update_fields=["sort_order"])  # rows seeded before the ranks: still last


def ensure_catalog() -> None:
    """Seed (and read the providers' lists) once per process, on first use."""
    global _synced
    if _synced:
        return
    with _sync_lock:
        if not _synced:
            catalog_sync()
            _synced = True


def reset_catalog_cache() -> None:
    global _synced
    _synced = False


# ---- lifecycle -------------------------------------------------------------------------------


def _successor_id(model: ModelConfig) -> str:
    if model.successor:
        return model.successor
    facts = catalog.lookup(model.provider.kind, model.model_id)
    return facts.successor if facts else ""


def model_mark_unavailable(model: ModelConfig, *, note: str) -> bool:
    """The provider no longer serves this model (gone from its list, or 404): hidden from
    pickers, with the date and its successor. False when staff decided its status."""
    if "status" in (model.staff_overrides or ()):
        return False
    if model.status == ModelConfig.Status.UNAVAILABLE:
        return False
    model.status = ModelConfig.Status.UNAVAILABLE
    model.status_date = timezone.localdate()
    model.status_note = note
    model.successor = _successor_id(model)
    model.save(update_fields=["status", "status_date", "status_note", "successor"])
    log.warning("model %s of %s is now unavailable: %s", model.model_id, model.provider, note)
    return True


def successor_for_user(user, model: ModelConfig) -> ModelConfig | None:
    """What to continue with when `model` is gone: its named successor if this user may use it,
    else the best model the user may use on the same provider, else their default."""
    offered = models_for_user(user)
    if not offered:
        return None
    wanted = _successor_id(model)
    if wanted:
        for candidate in offered:
            if candidate.provider_id == model.provider_id and catalog.same_model(
                candidate.model_id, wanted
            ):
                return candidate
    same_provider = [m for m in offered if m.provider_id == model.provider_id]
    return (same_provider or offered)[0]


def served_model_for(*, model: ModelConfig, served: str) -> tuple[str, ModelConfig | ModelFacts]:
    """The model that actually answered, when the provider says it is another one than asked
    (a reseller redirecting K2.5 to K3): (its id, what to price it with). ("", model) when it
    is the same model, or when the asked model is not one the catalog knows (a self-hosted
    server's own names are staff's business)."""
    kind = model.provider.kind
    if not served or catalog.same_model(served, model.model_id):
        return "", model
    if catalog.lookup(kind, model.model_id) is None:
        return "", model
    for candidate in model.provider.models.all():
        if catalog.same_model(candidate.model_id, served):
            return served, candidate
    facts = catalog.lookup(kind, served)
    if facts is None:
        return served, model  # unknown: the asked model's prices are the best we know
    return served, facts


# ---- pickers ---------------------------------------------------------------------------------


def models_for_user(user) -> list[ModelConfig]:
    """The models this user may pick: enabled, available ones of enabled providers that the
    user's current team may use (teams.restrict_models), best first, demo last."""
    ensure_catalog()
    available = ModelConfig.objects.filter(enabled=True, provider__enabled=True).exclude(
        status=ModelConfig.Status.UNAVAILABLE
    )
    return list(
        teams.restrict_models(available, user)
        .select_related("provider")
        .order_by("sort_order", "display_name")
    )


def default_model_for(user) -> ModelConfig | None:
    """The best available model; the demo only when no real provider exists."""
    models = models_for_user(user)
    return models[0] if models else None


def model_gone(message_id: int) -> dict:
    """A reply's model answered 404 model_not_found: mark it unavailable and say what to
    continue with -> extra fields for the error frame ({"successor": {"id", "name"}} or {})."""
    message = (
        Message.objects.select_related("model__provider", "conversation__owner")
        .filter(pk=message_id)
        .first()
    )
    if message is None or message.model is None:
        return {}
    model_mark_unavailable(message.model, note=GONE_404)
    successor = successor_for_user(message.conversation.owner, message.model)
    if successor is None or successor.pk == message.model_id:
        return {}
    return {"successor": {"id": successor.pk, "name": successor.display_name}}


def model_gone_message(model: ModelConfig, user) -> str:
    """What a user is told about a conversation whose model the provider no longer serves."""
    when = f" (since {model.status_date:%Y-%m-%d})" if model.status_date else ""
    text = f"{model.display_name} is no longer available from {model.provider.name}{when}."
    successor = successor_for_user(user, model)
    if successor is not None and successor.pk != model.pk:
        text += f" Continue with {successor.display_name}."
    return text
