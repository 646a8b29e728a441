"""The Kimi lineup as data: discovery from a real fake Moonshot `/v1/models`, the facts and
request contract of each family (request bodies asserted field by field through the real
websocket stack), models that disappear or answer 404, staff decisions that survive every sync,
and usage priced from the model that actually answered."""

import json
from decimal import Decimal

import httpx
import pytest
from channels.db import database_sync_to_async
from django.test import Client

from chatapp import model_catalog
from chatapp.model_catalog import catalog_sync, models_for_user, reset_catalog_cache
from chatapp.models import Conversation, Message, ModelConfig, Provider, UsageRecord
from chatapp.providers import catalog
from chatapp.providers.moonshot import MoonshotClient
from tests.admin_forms import admin_post
from tests.conftest import connect, receive_until
from tests.factories import user_create
from tests.fake_upstream import FakeResponse, chunk, sse
from tests.provider_fakes import moonshot_error, moonshot_stream

pytestmark = pytest.mark.django_db(transaction=True)

MOONSHOT_KEY = "sk-moonshot-test-key-4321"
TODAY = ["kimi-k3", "kimi-k2.6", "kimi-k2.7-code", "kimi-k3.1-pro", "kimi-k2.5"]
SAMPLING = ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty")


@pytest.fixture
def moonshot(_upstream_server, settings):
    """A fake Moonshot listing today's lineup (kimi-k2.5 still listed, as lists lag)."""
    _upstream_server.reset()
    _upstream_server.models = list(TODAY)
    settings.MOONSHOT_API_KEY = MOONSHOT_KEY
    settings.MOONSHOT_BASE_URL = _upstream_server.base_url
    reset_catalog_cache()
    catalog_sync()
    return _upstream_server


def model(model_id: str) -> ModelConfig:
    return ModelConfig.objects.select_related("provider").get(model_id=model_id)


@database_sync_to_async
def make_chat(*, model_id: str, **fields) -> tuple:
    user = user_create()
    conversation = Conversation.objects.create(owner=user, model=model(model_id), **fields)
    return user, conversation


async def chat(user, conversation, text: str = "Hello?") -> tuple[list[dict], Message]:
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": text})
    frames = await receive_until(ws, "reply.end", timeout=15)
    await ws.disconnect()
    reply = await Message.objects.aget(pk=frames[-1]["message"]["id"])
    return frames, reply


async def send_refused(user, conversation, text: str = "Hello?") -> dict:
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": text})
    frame = await ws.receive_json_from(timeout=5)
    await ws.disconnect()
    return frame


def staff_client() -> Client:
    client = Client()
    client.force_login(user_create(is_staff=True, is_superuser=True))
    return client


def admin_form(model: ModelConfig, **changes) -> dict:
    """The admin change form as a browser would post it, with `changes` applied."""
    data = {
        "provider": model.provider_id,
        "model_id": model.model_id,
        "display_name": model.display_name,
        "description": model.description,
        "family": model.family,
        "context_window": model.context_window,
        "max_output_tokens": model.max_output_tokens or "",
        "max_output_limit": model.max_output_limit or "",
        "max_image_edge": model.max_image_edge,
        "contract": json.dumps(model.contract),
        "price_input": model.price_input,
        "price_cached_input": model.price_cached_input,
        "price_output": model.price_output,
        "price_batch_input": model.price_batch_input or "",
        "price_batch_output": model.price_batch_output or "",
        "status": model.status,
        "status_date": model.status_date or "",
        "status_note": model.status_note,
        "successor": model.successor,
        "sort_order": model.sort_order,
    }
    for flag in ("enabled", "vision", "video", "reasoning"):
        if getattr(model, flag):
            data[flag] = "on"
    for name, value in changes.items():
        if value is False:
            data.pop(name, None)
        elif value is True:
            data[name] = "on"
        else:
            data[name] = value
    return data


# ---- discovery and facts --------------------------------------------------------------------


def test_todays_lineup_is_offered_with_its_facts_and_k25_never(moonshot):
    user = user_create()
    offered = models_for_user(user)
    names = [m.model_id for m in offered]
    assert names[:4] == ["kimi-k3", "kimi-k3.1-pro", "kimi-k2.6", "kimi-k2.7-code"]
    assert "kimi-k2.5" not in names
    assert model_catalog.default_model_for(user).model_id == "kimi-k3"
    assert moonshot.model_list_requests()[-1].headers["authorization"] == f"Bearer {MOONSHOT_KEY}"

    k3 = model("kimi-k3")
    assert (k3.display_name, k3.family, k3.context_window) == ("Kimi K3", "kimi-k3", 1_048_576)
    assert (k3.max_output_tokens, k3.max_output_limit) == (131_072, 1_048_576)
    assert (k3.vision, k3.video, k3.reasoning_mode) == (True, True, "always")
    assert (k3.price_input, k3.price_cached_input, k3.price_output) == (
        Decimal("3.00"),
        Decimal("0.30"),
        Decimal("15.00"),
    )
    assert k3.contract["thinking"] == "none" and k3.contract["sampling"] == "fixed"

    k31 = model("kimi-k3.1-pro")
    assert (k31.display_name, k31.family, k31.video) == ("Kimi K3.1 Pro", "kimi-k3", True)
    assert (k31.price_input, k31.price_output) == (Decimal("2.00"), Decimal("10.00"))

    k26 = model("kimi-k2.6")
    assert (k26.context_window, k26.reasoning_mode, k26.video) == (262_144, "optional", True)
    assert (k26.price_input, k26.price_cached_input, k26.price_output) == (
        Decimal("0.95"),
        Decimal("0.16"),
        Decimal("4.00"),
    )
    assert k26.contract["fixed_temperature"] == {"thinking": 1.0, "instant": 0.6}

    code = model("kimi-k2.7-code")
    assert (code.display_name, code.reasoning_mode, code.contract["thinking"]) == (
        "Kimi K2.7 Code",
        "always",
        "always",
    )
    assert (code.price_input, code.price_cached_input, code.price_output) == (
        Decimal("0.95"),
        Decimal("0.19"),
        Decimal("4.00"),
    )

    retired = model("kimi-k2.5")
    assert retired.status == ModelConfig.Status.UNAVAILABLE
    assert retired.successor == "kimi-k2.6" and "2026-08-31" in retired.status_note


def test_a_new_listed_model_of_a_known_family_is_offered_an_unknown_one_waits_for_staff(
    moonshot,
):
    moonshot.models = [*TODAY, "kimi-k3.2-max", "moonshot-v9-experimental"]
    report = catalog_sync()
    assert "Moonshot: Kimi K3.2 Max" in report.added
    new = model("kimi-k3.2-max")
    assert (new.family, new.enabled, new.context_window) == ("kimi-k3", True, 1_048_576)
    assert new.contract["name"] == "kimi-k3"
    unknown = model("moonshot-v9-experimental")
    assert (unknown.family, unknown.enabled, unknown.contract["name"]) == ("", False, "plain")
    offered = [m.model_id for m in models_for_user(user_create())]
    assert "kimi-k3.2-max" in offered and "moonshot-v9-experimental" not in offered


def test_reseller_prefixes_resolve_to_the_same_family():
    assert catalog.lookup("workers_ai", "@cf/moonshotai/kimi-k3").family == "kimi-k3"
    assert catalog.lookup("openai_compat", "moonshotai/kimi-k2.6").display_name == "Kimi K2.6"
    assert catalog.lookup("openai_compat", "moonshotai/kimi-k2.7-code-highspeed").family == (
        "kimi-k2.7-code"
    )
    assert catalog.lookup("openai_compat", "deepseek-chat") is None
    assert catalog.same_model("kimi-k2.6", "moonshotai/kimi-k2.6-20260420")
    assert not catalog.same_model("kimi-k2.5", "kimi-k3")


# ---- request contracts, field by field -------------------------------------------------------


async def test_k3_request_has_no_thinking_no_sampling_and_its_own_output_default(moonshot):
    moonshot.enqueue(moonshot_stream(["ok"], reasoning=["hm"], model="kimi-k3"))
    # A temperature and a thinking switch left on the conversation must not reach K3.
    user, conversation = await make_chat(model_id="kimi-k3", thinking=False, temperature=0.2)
    await chat(user, conversation)

    body = moonshot.chat_requests()[-1].json
    assert body["model"] == "kimi-k3"
    assert "thinking" not in body and "chat_template_kwargs" not in body
    assert "reasoning_effort" not in body  # the default (max) is never sent
    for key in SAMPLING:
        assert key not in body
    assert body["max_completion_tokens"] == 131_072
    assert "max_tokens" not in body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    # Turn 2: a non-default effort is sent, and the earlier assistant turn carries its
    # reasoning back even though it made no tool call.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(reasoning_effort="low")
    conversation = await Conversation.objects.select_related("model").aget(pk=conversation.pk)
    moonshot.enqueue(moonshot_stream(["again"], model="kimi-k3"))
    await chat(user, conversation, "More?")
    body = moonshot.chat_requests()[-1].json
    assert body["reasoning_effort"] == "low"
    assert body["messages"][1] == {"role": "assistant", "content": "ok", "reasoning_content": "hm"}


async def test_k31_pro_follows_the_k3_contract_at_its_own_prices(moonshot):
    usage_stream = moonshot_stream(["ok"], model="kimi-k3.1-pro", prompt_tokens=1_000_000)
    moonshot.enqueue(usage_stream)
    user, conversation = await make_chat(model_id="kimi-k3.1-pro", temperature=1.5)
    _, reply = await chat(user, conversation)
    body = moonshot.chat_requests()[-1].json
    assert body["model"] == "kimi-k3.1-pro" and "thinking" not in body
    for key in SAMPLING:
        assert key not in body
    assert body["max_completion_tokens"] == 131_072 and "reasoning_effort" not in body
    # 2,989 cached at $0.20, the rest of the million at $2.00, one output token at $10.00.
    cached, out = 2989, 1
    expected = (Decimal(1_000_000 - cached) * 2 + cached * Decimal("0.2") + out * 10) / 1_000_000
    assert reply.cost_usd == expected.quantize(Decimal("0.000001"))
    assert reply.served_model == ""


async def test_k3_output_limit_is_clamped_to_the_window(moonshot):
    user, conversation = await make_chat(model_id="kimi-k3")
    await ModelConfig.objects.filter(model_id="kimi-k3").aupdate(context_window=100_000)
    conversation = await Conversation.objects.select_related("model").aget(pk=conversation.pk)
    moonshot.enqueue(moonshot_stream(["ok"], model="kimi-k3"))
    await chat(user, conversation)
    budget = moonshot.chat_requests()[-1].json["max_completion_tokens"]
    assert 90_000 < budget < 100_000


async def test_k27_code_never_gets_a_thinking_switch_or_sampling(moonshot):
    moonshot.enqueue(moonshot_stream(["ok"], reasoning=["r"], model="kimi-k2.7-code"))
    user, conversation = await make_chat(model_id="kimi-k2.7-code", thinking=False, temperature=0.7)
    await chat(user, conversation)
    body = moonshot.chat_requests()[-1].json
    assert "thinking" not in body  # "disabled" is a 400 for K2.7 Code
    assert "reasoning_effort" not in body and "chat_template_kwargs" not in body
    for key in SAMPLING:
        assert key not in body
    assert body["max_completion_tokens"] == 32_768  # the site default, no family default

    moonshot.enqueue(moonshot_stream(["two"], model="kimi-k2.7-code"))
    await chat(user, conversation, "Next")
    turn = moonshot.chat_requests()[-1].json["messages"][1]
    assert turn == {"role": "assistant", "content": "ok", "reasoning_content": "r"}


async def test_k26_keeps_its_thinking_switch_and_sends_no_sampling(moonshot):
    moonshot.enqueue(moonshot_stream(["ok"], reasoning=["r"]))
    user, conversation = await make_chat(model_id="kimi-k2.6", thinking=False, temperature=0.3)
    await chat(user, conversation)
    body = moonshot.chat_requests()[-1].json
    assert body["thinking"] == {"type": "disabled"}
    assert "reasoning_effort" not in body and "chat_template_kwargs" not in body
    for key in SAMPLING:
        assert key not in body
    assert body["max_completion_tokens"] == 32_768

    moonshot.enqueue(moonshot_stream(["two"]))
    await chat(user, conversation, "Next")
    turn = moonshot.chat_requests()[-1].json["messages"][1]
    assert turn == {"role": "assistant", "content": "ok"}  # K2.6 echoes tool turns only


async def test_workers_ai_k3_gets_the_k3_shape(_upstream_server, settings):
    _upstream_server.reset()
    settings.CLOUDFLARE_ACCOUNT_ID = "acct1"
    settings.CLOUDFLARE_API_TOKEN = "cf-token-test-7777"
    settings.CLOUDFLARE_API_BASE = _upstream_server.base_url
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()
    _upstream_server.enqueue(moonshot_stream(["ok"], model="@cf/moonshotai/kimi-k3"))
    user, conversation = await make_chat(model_id="@cf/moonshotai/kimi-k3", thinking=False)
    await chat(user, conversation)
    request = _upstream_server.requests[-1]
    assert request.path.endswith("/run/@cf/moonshotai/kimi-k3")
    body = request.json
    assert "chat_template_kwargs" not in body and "thinking" not in body
    assert "temperature" not in body and "model" not in body
    assert body["max_completion_tokens"] == 131_072


# ---- models that go away ----------------------------------------------------------------------


async def test_a_model_removed_from_the_list_becomes_unavailable_with_its_successor(moonshot):
    user, conversation = await make_chat(model_id="kimi-k2.7-code")
    moonshot.models = [m for m in TODAY if m != "kimi-k2.7-code"]
    report = await database_sync_to_async(catalog_sync)()
    assert report.unavailable == ["Moonshot: Kimi K2.7 Code"]
    gone = await database_sync_to_async(model)("kimi-k2.7-code")
    assert gone.status == ModelConfig.Status.UNAVAILABLE and gone.status_date is not None
    offered = await database_sync_to_async(models_for_user)(user)
    assert "kimi-k2.7-code" not in [m.model_id for m in offered]

    # A send on it is refused before anything is written or sent, naming what to continue with.
    before = len(moonshot.chat_requests())
    frame = await send_refused(user, conversation)
    assert frame["type"] == "error" and frame["code"] == "model_retired"
    assert "Kimi K2.7 Code is no longer available" in frame["message"]
    assert "Continue with Kimi K3" in frame["message"]
    assert len(moonshot.chat_requests()) == before
    assert not await Message.objects.filter(conversation=conversation).aexists()

    # The page offers the successor.
    page = await database_sync_to_async(_page_data)(user, conversation)
    assert page["model_gone"]["successor"]["name"] == "Kimi K3"

    # Listed again: available again.
    moonshot.models = list(TODAY)
    await database_sync_to_async(catalog_sync)()
    assert (await database_sync_to_async(model)("kimi-k2.7-code")).status == "available"


def _page_data(user, conversation) -> dict:
    client = Client()
    client.force_login(user)
    response = client.get(f"/c/{conversation.pk}/")
    assert response.status_code == 200
    return response.context["page_data"]


async def test_a_model_answering_404_becomes_unavailable_and_offers_its_successor(moonshot):
    moonshot.enqueue(
        moonshot_error(404, "resource_not_found_error", "Not found the model kimi-k3.1-pro")
    )
    user, conversation = await make_chat(model_id="kimi-k3.1-pro")
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hi"})
    frames = await receive_until(ws, "reply.end", timeout=10)
    await ws.disconnect()
    error = next(f for f in frames if f["type"] == "error")
    assert error["code"] == "model_not_found"
    successor = await database_sync_to_async(model)("kimi-k3")
    assert error["successor"] == {"id": successor.pk, "name": "Kimi K3"}
    gone = await database_sync_to_async(model)("kimi-k3.1-pro")
    assert gone.status == ModelConfig.Status.UNAVAILABLE and "404" in gone.status_note
    # A restart does not bring it back, though the list still names it (lists lag).
    reset_catalog_cache()
    await database_sync_to_async(model_catalog.ensure_catalog)()
    assert (await database_sync_to_async(model)("kimi-k3.1-pro")).status == "unavailable"


# ---- staff decisions -------------------------------------------------------------------------


def test_catalog_sync_twice_with_staff_edits_in_between_keeps_the_edits(moonshot):
    client = staff_client()
    k3, k26 = model("kimi-k3"), model("kimi-k2.6")
    response = client.post(
        f"/admin/chatapp/modelconfig/{k3.pk}/change/",
        admin_form(
            k3,
            display_name="K3 (house)",
            price_input="2.5000",
            context_window=500_000,
            max_output_tokens=65_536,
            vision=False,
        ),
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    client.post(f"/admin/chatapp/modelconfig/{k26.pk}/change/", admin_form(k26, enabled=False))
    assert set(model("kimi-k3").staff_overrides) >= {
        "display_name",
        "price_input",
        "context_window",
        "max_output_tokens",
        "vision",
    }
    assert model("kimi-k2.6").staff_overrides == ["enabled"]

    for _ in range(2):  # a refresh, then a restart
        catalog_sync()
        reset_catalog_cache()
        model_catalog.ensure_catalog()
    k3, k26 = model("kimi-k3"), model("kimi-k2.6")
    assert (k3.display_name, k3.price_input, k3.context_window) == (
        "K3 (house)",
        Decimal("2.5"),
        500_000,
    )
    assert (k3.max_output_tokens, k3.vision) == (65_536, False)
    assert k3.price_output == Decimal("15.00")  # not edited: still the catalog's
    assert k26.enabled is False
    assert "kimi-k2.6" not in [m.model_id for m in models_for_user(user_create())]


def test_a_model_staff_add_gets_the_catalogs_facts_and_stays_enabled(moonshot):
    moonshot.models = None  # the list is not readable: the catalog's lineup is used
    provider = Provider.objects.get(name="Moonshot")
    response = staff_client().post(
        "/admin/chatapp/modelconfig/add/",
        {
            "provider": provider.pk,
            "model_id": "kimi-k3.1-pro-highspeed",
            "display_name": "",
            "enabled": "on",
            "context_window": 262_144,
            "max_image_edge": 3000,
            "contract": "{}",
            "price_input": "0",
            "price_cached_input": "0",
            "price_output": "0",
            "status": "available",
            "sort_order": 100,
            "description": "",
            "family": "",
            "status_note": "",
            "successor": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    added = model("kimi-k3.1-pro-highspeed")
    assert (added.display_name, added.family, added.context_window) == (
        "Kimi K3.1 Pro Highspeed",
        "kimi-k3",
        1_048_576,
    )
    assert added.price_input == Decimal("3.00") and added.contract["thinking"] == "none"
    catalog_sync()
    reset_catalog_cache()
    catalog_sync()
    assert model("kimi-k3.1-pro-highspeed").enabled is True


def test_environment_seeding_never_undoes_a_staff_decision(fake_upstream, settings):
    """Issue 12's rule on the OpenAI-compatible provider the environment owns: a model staff
    disabled stays disabled, one staff added stays enabled."""
    compat = model("fake-model")
    client = staff_client()
    client.post(
        f"/admin/chatapp/modelconfig/{compat.pk}/change/", admin_form(compat, enabled=False)
    )
    ModelConfig.objects.create(
        provider=compat.provider, model_id="staff-extra", display_name="Staff extra"
    )
    catalog_sync()
    reset_catalog_cache()
    catalog_sync()
    assert model("fake-model").enabled is False
    assert model("staff-extra").enabled is True


def test_the_admin_refresh_button_reads_the_lists_and_shows_notices(moonshot):
    client = staff_client()
    moonshot.models = [m for m in TODAY if m != "kimi-k2.6"]
    response = client.post("/admin/chatapp/modelconfig/refresh/", follow=True)
    page = response.content.decode()
    assert "Models refreshed" in page and "now unavailable: Moonshot: Kimi K2.6" in page
    assert "Kimi K2.6 (Moonshot) is unavailable since" in page
    assert "Kimi K2.5 (Moonshot) is unavailable since 2026-08-31; successor: kimi-k2.6" in page
    assert 'id="refresh-models"' in page
    assert client.get("/admin/chatapp/modelconfig/refresh/").status_code == 403


# ---- billing the model that answered ---------------------------------------------------------


async def test_a_reseller_redirecting_k25_to_k3_is_billed_at_k3_prices(fake_upstream, settings):
    settings.OPENAI_COMPAT_MODELS = ["moonshotai/kimi-k2.5"]
    reset_catalog_cache()
    await database_sync_to_async(catalog_sync)()
    usage = {
        "prompt_tokens": 1_000_000,
        "completion_tokens": 100_000,
        "total_tokens": 1_100_000,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    served = "kimi-k3"  # what the reseller's chunks say answered
    parts = [sse(chunk(content="", model=served)), sse(chunk(content="Hi", model=served))]
    parts += [sse(chunk(finish_reason="stop", usage=usage, model=served)), sse("[DONE]")]
    fake_upstream.enqueue(FakeResponse(parts=parts))
    user, conversation = await make_chat(model_id="moonshotai/kimi-k2.5")
    frames, reply = await chat(user, conversation)

    # 1M input at $3.00 and 100k output at $15.00: K3's prices, not K2.5's ($0.60 / $3.00).
    assert reply.cost_usd == Decimal("4.500000")
    assert reply.served_model == served
    record = await UsageRecord.objects.aget(message=reply)
    assert (record.cost_usd, record.served_model) == (Decimal("4.500000"), served)


# ---- the China platform ----------------------------------------------------------------------


def test_a_401_says_the_platforms_keys_are_not_interchangeable():
    client = MoonshotClient(
        base_url="https://api.moonshot.ai/v1", api_key="sk-" + "x" * 20, http=None, name="Moonshot"
    )
    body = b'{"error":{"message":"Invalid Authentication","type":"invalid_authentication_error"}}'
    error = client.error_from_response(401, body, httpx.Headers())
    assert error.code == "auth"
    assert "api.moonshot.cn" in error.staff_message
    assert "not interchangeable" in error.staff_message
    assert "moonshot.cn" not in error.user_message  # users get our own short wording


def test_video_parts_have_moonshots_documented_shape():
    from chatapp.providers import errors as provider_errors
    from chatapp.providers.openai_compat import check_images, video_part

    part = video_part("video/mp4", b"\x00\x00\x00\x18ftypmp42")
    assert part == {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64,AAAAGGZ0eXBtcDQy"},
    }
    check_images([{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}])
    check_images(
        [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "ms://f1"}}]}]
    )
    with pytest.raises(provider_errors.UnsupportedImage):
        check_images(
            [
                {
                    "role": "user",
                    "content": [{"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}],
                }
            ]
        )
    with pytest.raises(ValueError):
        video_part("video/x-matroska", b"")


def test_staff_can_hand_a_model_back_to_the_catalog(moonshot):
    client = staff_client()
    k3 = model("kimi-k3")
    client.post(
        f"/admin/chatapp/modelconfig/{k3.pk}/change/", admin_form(k3, price_output="9.0000")
    )
    assert model("kimi-k3").price_output == Decimal("9")
    client.post(
        "/admin/chatapp/modelconfig/",
        {"action": "use_catalog_facts", "_selected_action": [k3.pk]},
    )
    k3 = model("kimi-k3")
    assert (k3.staff_overrides, k3.price_output) == ([], Decimal("15.00"))


def test_staff_edits_on_an_environment_provider_with_a_readable_list_survive_two_syncs(
    fake_upstream,
):
    """Through the real admin forms: staff disable and re-describe the model the environment
    names, enable a listed model the catalog does not know, and add one the server's list
    does not show. Two syncs (a refresh, then a restart) undo none of it."""
    fake_upstream.models = ["fake-model", "listed-unknown"]
    catalog_sync()
    assert model("listed-unknown").enabled is False  # unknown: waits for staff
    client = staff_client()
    base = "/admin/chatapp/modelconfig"
    response = admin_post(
        client,
        f"{base}/{model('fake-model').pk}/change/",
        enabled=False,
        display_name="Fake (house)",
        price_input="1.2500",
        context_window=64_000,
        max_output_limit=8_000,
        vision=False,
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    response = admin_post(client, f"{base}/{model('listed-unknown').pk}/change/", enabled=True)
    assert response.status_code == 302, response.content.decode()[:3000]
    provider = Provider.objects.get(name="OpenAI-compatible")
    response = admin_post(
        client,
        f"{base}/add/",
        provider=provider.pk,
        model_id="staff-extra",
        display_name="Staff extra",
        enabled=True,
    )
    assert response.status_code == 302, response.content.decode()[:3000]

    for _ in range(2):  # a refresh, then a restart
        catalog_sync()
        reset_catalog_cache()
        model_catalog.ensure_catalog()

    fake = model("fake-model")
    assert fake.enabled is False and fake.vision is False
    assert (fake.display_name, fake.price_input) == ("Fake (house)", Decimal("1.25"))
    assert (fake.context_window, fake.max_output_limit) == (64_000, 8_000)
    assert model("listed-unknown").enabled is True
    extra = model("staff-extra")
    assert extra.enabled is True and extra.status == ModelConfig.Status.AVAILABLE
    offered = [m.model_id for m in models_for_user(user_create())]
    assert "staff-extra" in offered and "listed-unknown" in offered
    assert "fake-model" not in offered


def test_an_environment_provider_staff_switched_off_stays_off(fake_upstream):
    """Seeding owns the provider's address and key, not staff's decision to switch it off."""
    client = staff_client()
    provider = Provider.objects.get(name="OpenAI-compatible")
    url = f"/admin/chatapp/provider/{provider.pk}/change/"
    response = admin_post(client, url, enabled=False)
    assert response.status_code == 302, response.content.decode()[:3000]
    for _ in range(2):
        catalog_sync()
        reset_catalog_cache()
        model_catalog.ensure_catalog()
    assert Provider.objects.get(pk=provider.pk).enabled is False
    assert "fake-model" not in [m.model_id for m in models_for_user(user_create())]

    response = admin_post(client, url, enabled=True)
    assert response.status_code == 302
    catalog_sync()
    assert Provider.objects.get(pk=provider.pk).enabled is True
