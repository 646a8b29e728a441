"""Providers and models: seeded from the environment, then managed by staff in the admin.

Seeding creates rows with the built-in facts and updates only what the environment owns (base URL,
key, enabled); prices and flags that staff edited are left alone.
"""

import threading

from django.conf import settings
from django.db import transaction

from . import teams
from .models import ModelConfig, Provider
from .providers.catalog import MOONSHOT_MODELS, WORKERS_AI_MODELS, facts_for, parse_model_list

DEMO_PROVIDER = "Demo"
DEMO_MODEL_ID = "demo"
DEMO_SORT_ORDER = 10_000  # listed last once a real provider exists

_synced = False
_sync_lock = threading.Lock()


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
    provider, _ = Provider.objects.update_or_create(name=name, defaults=defaults)
    return provider


def workers_ai_base_url() -> str:
    """`{CLOUDFLARE_API_BASE}/accounts/{id}/ai`: the root of /run/{model} and /v1/."""
    base = settings.CLOUDFLARE_API_BASE.rstrip("/")
    return f"{base}/accounts/{settings.CLOUDFLARE_ACCOUNT_ID}/ai"


def _upsert_models(provider: Provider, entries: list[tuple[str, bool]], first_order: int) -> None:
    wanted = []
    for index, (model_id, vision) in enumerate(entries):
        facts = facts_for(model_id)
        defaults = {
            "display_name": facts.display_name if facts else model_id,
            "description": facts.description if facts else "",
            "context_window": facts.context_window if facts else 131_072,
            "vision": vision and (facts.vision if facts else True),
            "reasoning": facts.reasoning if facts else False,
            "price_input": facts.price_input if facts else 0,
            "price_cached_input": facts.price_cached_input if facts else 0,
            "price_output": facts.price_output if facts else 0,
            "sort_order": first_order + index,
        }
        model, created = ModelConfig.objects.get_or_create(
            provider=provider, model_id=model_id, defaults=defaults
        )
        if not created and not model.enabled:
            model.enabled = True
            model.save(update_fields=["enabled"])
        wanted.append(model_id)
    provider.models.exclude(model_id__in=wanted).update(enabled=False)


@transaction.atomic
def catalog_sync() -> None:
    """Make the Provider / ModelConfig rows match the environment (settings)."""
    seeded = []
    if settings.MOONSHOT_API_KEY:
        moonshot = _upsert_provider(
            name="Moonshot",
            kind=Provider.Kind.MOONSHOT,
            base_url=settings.MOONSHOT_BASE_URL,
            api_key=settings.MOONSHOT_API_KEY,
            max_concurrency=settings.MOONSHOT_MAX_CONCURRENCY,
        )
        _upsert_models(moonshot, [(m, True) for m in MOONSHOT_MODELS], first_order=10)
        seeded.append(moonshot.pk)
    if settings.CLOUDFLARE_ACCOUNT_ID and settings.CLOUDFLARE_API_TOKEN:
        workers = _upsert_provider(
            name="Cloudflare Workers AI",
            kind=Provider.Kind.WORKERS_AI,
            base_url=workers_ai_base_url(),
            api_key=settings.CLOUDFLARE_API_TOKEN,
            max_concurrency=settings.CLOUDFLARE_MAX_CONCURRENCY,
        )
        _upsert_models(workers, [(m, True) for m in WORKERS_AI_MODELS], first_order=15)
        seeded.append(workers.pk)
    if settings.OPENAI_COMPAT_BASE_URL and settings.OPENAI_COMPAT_MODELS:
        compat = _upsert_provider(
            name="OpenAI-compatible",
            kind=Provider.Kind.OPENAI_COMPAT,
            base_url=settings.OPENAI_COMPAT_BASE_URL,
            api_key=settings.OPENAI_COMPAT_API_KEY,
            max_concurrency=settings.OPENAI_COMPAT_MAX_CONCURRENCY,
        )
        _upsert_models(compat, parse_model_list(settings.OPENAI_COMPAT_MODELS), first_order=20)
        seeded.append(compat.pk)
    # A provider whose variables were removed stops being offered (its history stays).
    Provider.objects.filter(managed_by_env=True).exclude(pk__in=seeded).exclude(
        kind=Provider.Kind.DEMO
    ).update(enabled=False)

    demo, _ = Provider.objects.get_or_create(
        name=DEMO_PROVIDER, defaults={"kind": Provider.Kind.DEMO, "managed_by_env": True}
    )
    ModelConfig.objects.get_or_create(
        provider=demo,
        model_id=DEMO_MODEL_ID,
        defaults={
            "display_name": "Demo (offline)",
            "description": "A canned reply streamed locally; not a real model.",
            "context_window": 1_000_000,
            "vision": True,
            "sort_order": DEMO_SORT_ORDER,
        },
    )


def ensure_catalog() -> None:
    """Seed once per process, on first use (cheap afterwards)."""
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


def models_for_user(user) -> list[ModelConfig]:
    """The models this user may pick: enabled ones of enabled providers that the user's current
    team may use (teams.restrict_models), demo last."""
    ensure_catalog()
    available = ModelConfig.objects.filter(enabled=True, provider__enabled=True)
    return list(
        teams.restrict_models(available, user)
        .select_related("provider")
        .order_by("sort_order", "display_name")
    )


def default_model_for(user) -> ModelConfig | None:
    """The first real model; the demo only when no real provider exists."""
    models = models_for_user(user)
    return models[0] if models else None
