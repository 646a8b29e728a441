"""Known model families and models, read from kimi_catalog.json (data, not code).

`lookup(kind, model_id)` resolves an upstream id (reseller prefixes such as `moonshotai/` or
`@cf/moonshotai/` stripped) to its facts: display name, context window, output limits, input
modalities, reasoning mode, the request contract the provider layer applies, prices and lifecycle.
An id no family matches gets None: a plain OpenAI-compatible model that staff must enable.

The catalog is the default; staff override any fact per model in the admin and the sync never
writes over an override (chatapp/model_catalog.py).
"""

import json
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from functools import cache
from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("kimi_catalog.json")
TEXT_ONLY_SUFFIX = ":text"

# The request contract of a model nobody described: the user's temperature is sent, and a model
# staff mark as reasoning gets the provider kind's thinking switch.
PLAIN_CONTRACT = {"name": "plain", "thinking": "switch", "sampling": "free"}


@dataclass(frozen=True)
class ModelFacts:
    family: str
    display_name: str
    context_window: int
    max_output: int | None
    default_output: int | None
    modalities: tuple[str, ...]
    contract: dict
    price_input: Decimal
    price_cached_input: Decimal
    price_output: Decimal
    price_batch_input: Decimal | None = None
    price_batch_output: Decimal | None = None
    rank: int = 0
    description: str = ""
    status: str = "available"  # available | deprecated | retired
    status_date: date | None = None
    successor: str = ""
    sources: tuple[str, ...] = field(default=())

    @property
    def vision(self) -> bool:
        return "image" in self.modalities

    @property
    def video(self) -> bool:
        return "video" in self.modalities

    @property
    def reasoning(self) -> bool:
        return self.contract.get("reasoning", "off") != "off"


@cache
def load() -> dict:
    with CATALOG_PATH.open(encoding="utf-8") as handle:
        data = json.load(handle)
    for family in data["families"]:
        family["_match"] = [re.compile(p, re.IGNORECASE) for p in family["match"]]
    return data


def base_id(model_id: str) -> str:
    """The id without a reseller prefix (`@cf/moonshotai/kimi-k3` -> `kimi-k3`), lower case."""
    lowered = model_id.strip().lower()
    for prefix in load()["reseller_prefixes"]:
        if lowered.startswith(prefix):
            return lowered[len(prefix) :]
    return lowered.rsplit("/", 1)[-1]


def _family(key: str) -> dict | None:
    return next((f for f in load()["families"] if f["key"] == key), None)


def _model_entry(kind: str, model_id: str) -> dict | None:
    lowered, base = model_id.strip().lower(), base_id(model_id)
    best = None
    for entry in load()["models"]:
        kinds = entry.get("kinds")
        if kinds and kind not in kinds:
            continue
        entry_id = entry["id"].lower()
        if entry_id == lowered:
            return entry  # the exact id, prefix and all
        if best is None and entry_id == base:
            best = entry
    return best


def pretty_name(model_id: str) -> str:
    """`kimi-k3.1-pro-highspeed` -> `Kimi K3.1 Pro Highspeed`."""
    words = []
    for word in base_id(model_id).replace("_", "-").split("-"):
        if re.fullmatch(r"k\d[\w.]*", word):
            words.append(word.upper())
        elif word:
            words.append(word[:1].upper() + word[1:])
    return " ".join(words) or model_id


def _price(value) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def lookup(kind: str, model_id: str) -> ModelFacts | None:
    """The facts for `model_id` on a provider of `kind`, or None for an unknown model."""
    entry = _model_entry(kind, model_id)
    family = _family(entry["family"]) if entry else None
    if family is None:
        base = base_id(model_id)
        family = next(
            (f for f in load()["families"] if any(m.match(base) for m in f["_match"])), None
        )
    if family is None:
        return None
    entry = entry or {}
    merged = {**family, **{k: v for k, v in entry.items() if k not in ("id", "family")}}
    modalities = (
        merged.get("modalities_by_kind", {}).get(kind) if "modalities" not in entry else None
    )
    modalities = modalities or merged["modalities"]
    prices = merged["prices"]
    lifecycle = merged.get("lifecycle") or {}
    name = entry.get("name") or (
        family["name"] if base_id(model_id) == family["key"] else pretty_name(model_id)
    )
    if kind == "workers_ai" and "name" not in entry:
        name += " (Workers AI)"
    return ModelFacts(
        family=family["key"],
        display_name=name,
        context_window=merged["context_window"],
        max_output=merged.get("max_output"),
        default_output=merged.get("default_output"),
        modalities=tuple(modalities),
        contract=dict(merged["contract"]),
        price_input=_price(prices["input"]),
        price_cached_input=_price(prices["cached_input"]),
        price_output=_price(prices["output"]),
        price_batch_input=_price(prices.get("batch_input")),
        price_batch_output=_price(prices.get("batch_output")),
        rank=merged.get("rank", 0),
        description=merged.get("description", ""),
        status=lifecycle.get("status", "available"),
        status_date=date.fromisoformat(lifecycle["date"]) if lifecycle.get("date") else None,
        successor=lifecycle.get("successor", ""),
        sources=tuple(merged.get("sources", ())),
    )


def provider_models(kind: str) -> list[str]:
    """The ids the catalog offers on a provider of `kind` when its own list cannot be read
    (Workers AI has none)."""
    return list(load().get("provider_models", {}).get(kind, []))


def same_model(a: str, b: str) -> bool:
    """Whether two upstream ids name the same model: reseller prefixes and a date suffix aside
    (`kimi-k2.6` and `moonshotai/kimi-k2.6-20260420` do; `kimi-k2.5` and `kimi-k3` do not)."""
    return _undated(base_id(a)) == _undated(base_id(b))


def _undated(model_id: str) -> str:
    return re.sub(r"-\d{4,8}$", "", model_id)


def parse_model_list(raw_ids: list[str]) -> list[tuple[str, bool]]:
    """`OPENAI_COMPAT_MODELS` entries -> (model id, vision); `:text` marks a text-only model."""
    parsed = []
    for raw in raw_ids:
        if raw.endswith(TEXT_ONLY_SUFFIX):
            parsed.append((raw[: -len(TEXT_ONLY_SUFFIX)], False))
        else:
            parsed.append((raw, True))
    return parsed
