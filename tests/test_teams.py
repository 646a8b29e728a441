"""Teams: model access, budgets (checked before the upstream call), the per-user rate limit,
usage records priced with cached tokens at the cached price, and the pages that show spend."""

import csv
import datetime as dt
import io
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from chatapp import teams
from chatapp.errors import ClientError
from chatapp.model_catalog import models_for_user
from chatapp.models import Conversation, Message, ModelConfig, UsageRecord
from tests.conftest import connect, receive_until
from tests.factories import conversation_create, team_create, user_create
from tests.fake_upstream import error_response, stream_reply

UTC = dt.UTC


def at(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


@pytest.fixture
def clock(monkeypatch):
    """Freeze teams.now (the clock every budget, month and usage record reads)."""

    class Clock:
        moment = at(2026, 11, 15, 12, 0)

        def set(self, moment: dt.datetime) -> None:
            self.moment = moment

    frozen = Clock()
    monkeypatch.setattr(teams, "now", lambda: frozen.moment)
    return frozen


def spent(*, user, team, cost: str, when: dt.datetime, cached=0, prompt=0) -> UsageRecord:
    return UsageRecord.objects.create(
        user=user,
        team=team,
        cost_usd=Decimal(cost),
        created_at=when,
        prompt_tokens=prompt,
        cached_tokens=cached,
        model_name="Kimi K2.6",
    )


def refusal(conversation) -> ClientError:
    with pytest.raises(ClientError) as caught:
        teams.budget_check(conversation=conversation, user=conversation.owner)
    return caught.value


def priced_fake_model(*, input="0.60", cached="0.15", output="2.50") -> ModelConfig:
    model = ModelConfig.objects.get(model_id="fake-model")
    model.price_input, model.price_cached_input, model.price_output = (
        Decimal(input),
        Decimal(cached),
        Decimal(output),
    )
    model.save()
    return model


# ---- budgets --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_exactly_at_the_budget_is_refused_with_budget_spend_and_reset_date(clock):
    user = user_create()
    team = team_create(name="Design", members=[user], monthly_budget_usd=Decimal("10.00"))
    conversation = conversation_create(owner=user, team=team)
    spent(user=user, team=team, cost="9.999999", when=at(2026, 11, 2))
    teams.budget_check(conversation=conversation, user=user)  # a millionth below: allowed

    spent(user=user, team=team, cost="0.000001", when=at(2026, 11, 3))
    error = refusal(conversation)
    assert error.code == "budget_exceeded"
    assert "monthly budget of $10.00" in error.message
    assert "$10.00 spent this month" in error.message
    assert "resets on 1 December 2026" in error.message


@pytest.mark.django_db
def test_month_rollover_resets_the_budget(clock):
    user = user_create()
    team = team_create(members=[user], monthly_budget_usd=Decimal("5"))
    conversation = conversation_create(owner=user, team=team)
    spent(user=user, team=team, cost="5", when=at(2026, 10, 20))

    clock.set(at(2026, 10, 31, 23, 59, 59))
    assert "resets on 1 November 2026" in refusal(conversation).message
    clock.set(at(2026, 11, 1, 0, 0, 0))
    teams.budget_check(conversation=conversation, user=user)  # a new month: allowed


@pytest.mark.django_db
def test_months_follow_the_configured_time_zone(clock, settings):
    settings.TIME_ZONE = "Europe/Berlin"
    user = user_create()
    team = team_create(members=[user], monthly_budget_usd=Decimal("1"))
    conversation = conversation_create(owner=user, team=team)
    # 23:30 UTC on 31 October is already 00:30 on 1 November in Berlin.
    spent(user=user, team=team, cost="1", when=at(2026, 10, 31, 23, 30))
    clock.set(at(2026, 11, 10))
    assert refusal(conversation).code == "budget_exceeded"
    clock.set(at(2026, 10, 31, 22, 59))  # still October in Berlin: that spend is next month's
    teams.budget_check(conversation=conversation, user=user)


@pytest.mark.django_db
def test_member_cap_stops_one_member_not_the_team(clock):
    heavy, light = user_create(), user_create()
    team = team_create(members=[heavy, light], member_monthly_cap_usd=Decimal("0.50"))
    spent(user=heavy, team=team, cost="0.50", when=at(2026, 11, 1, 8))
    error = refusal(conversation_create(owner=heavy, team=team))
    assert "your monthly cap of $0.50" in error.message and "$0.50 spent" in error.message
    light_chat = conversation_create(owner=light, team=team)
    teams.budget_check(conversation=light_chat, user=light)


@pytest.mark.django_db
def test_spend_in_another_team_does_not_count(clock):
    user = user_create()
    rich = team_create(members=[user])
    poor = team_create(members=[user], monthly_budget_usd=Decimal("1"))
    spent(user=user, team=rich, cost="50", when=at(2026, 11, 2))
    teams.budget_check(conversation=conversation_create(owner=user, team=poor), user=user)


@pytest.mark.django_db(transaction=True)
async def test_send_at_the_budget_is_refused_before_any_upstream_call(fake_upstream, clock):
    user = await database_sync_to_async(user_create)()
    team = await database_sync_to_async(team_create)(
        name="Ops", members=[user], monthly_budget_usd=Decimal("2.00")
    )
    conversation = await database_sync_to_async(conversation_create)(owner=user, team=team)
    await database_sync_to_async(spent)(user=user, team=team, cost="2.00", when=at(2026, 11, 1))
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "one more question"})
    error = await ws.receive_json_from()
    assert error["type"] == "error" and error["code"] == "budget_exceeded"
    assert "Team Ops has reached its monthly budget of $2.00: $2.00 spent" in error["message"]
    assert fake_upstream.chat_requests() == []
    assert await Message.objects.filter(conversation=conversation).acount() == 0
    await ws.disconnect()


# ---- pricing and usage records --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_reply_writes_one_usage_record_with_cached_tokens_at_the_cached_price(
    fake_upstream, clock
):
    # 10,000 prompt tokens of which 8,000 cached, 1,000 completion, at $0.60 / $0.15 / $2.50
    # per million: 2,000 x 0.60 + 8,000 x 0.15 + 1,000 x 2.50 = 1,200 + 1,200 + 2,500 = $0.0049.
    await database_sync_to_async(priced_fake_model)()
    fake_upstream.enqueue(
        stream_reply(
            ["Fine."],
            usage={
                "prompt_tokens": 10_000,
                "completion_tokens": 1_000,
                "total_tokens": 11_000,
                "prompt_tokens_details": {"cached_tokens": 8_000},
            },
        )
    )
    user = await database_sync_to_async(user_create)()
    team = await database_sync_to_async(team_create)(members=[user])
    conversation = await database_sync_to_async(conversation_create)(owner=user, team=team)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "How much?"})
    end = (await receive_until(ws, "reply.end"))[-1]["message"]
    records = [r async for r in UsageRecord.objects.all()]
    assert len(records) == 1
    record = records[0]
    assert (record.user_id, record.team_id, record.conversation_id) == (
        user.pk,
        team.pk,
        conversation.pk,
    )
    assert (record.prompt_tokens, record.cached_tokens, record.completion_tokens) == (
        10_000,
        8_000,
        1_000,
    )
    assert record.cost_usd == Decimal("0.004900")
    assert (record.model_name, record.provider_name, record.status) == (
        "fake-model",
        "OpenAI-compatible",
        "complete",
    )
    assert end["cost_usd"] == "0.004900"
    assert record.created_at == clock.moment
    total = await database_sync_to_async(teams.spend)(team=team)
    assert total.cost_usd == Decimal("0.004900") and total.tokens == 11_000
    await ws.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_failed_and_regenerated_replies_each_write_one_record_that_outlives_them(
    fake_upstream, settings
):
    settings.UPSTREAM_MAX_RETRIES = 0
    fake_upstream.enqueue(error_response(500, "upstream broke"))
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hi"})
    failed = (await receive_until(ws, "reply.end"))[-1]["message"]
    assert failed["status"] == "error"
    await ws.send_json_to({"type": "regenerate", "message_id": failed["id"]})
    await receive_until(ws, "reply.end")
    records = [r async for r in UsageRecord.objects.order_by("id")]
    assert [(r.status, r.prompt_tokens, r.cost_usd) for r in records] == [
        ("error", 0, Decimal(0)),
        ("complete", 11, Decimal(0)),
    ]
    # The failed reply was replaced (deleted); its usage record stays, unlinked.
    assert records[0].message_id is None and records[0].conversation_id == conversation.pk
    await ws.disconnect()


# ---- model access ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_picker_and_server_offer_only_the_teams_models(client, fake_upstream):
    user = user_create()
    team = team_create(members=[user])
    team.allowed_models.set([ModelConfig.objects.get(model_id="fake-model")])
    assert [m.model_id for m in models_for_user(user)] == ["fake-model"]
    client.force_login(user)
    html = client.get("/").content.decode()
    assert "fake-model" in html and "Demo (offline)" not in html
    demo = ModelConfig.objects.get(model_id="demo")
    response = client.post("/api/conversations/", {"model": demo.pk})
    assert response.status_code == 400 and response.json()["code"] == "model_unavailable"
    # An unrestricted user (no team) still sees every model.
    assert len(models_for_user(user_create())) == 2


@pytest.mark.django_db(transaction=True)
async def test_a_hand_crafted_frame_naming_another_model_is_refused(fake_upstream):
    def setup():
        user = user_create()
        team = team_create(members=[user])
        team.allowed_models.set([ModelConfig.objects.get(model_id="fake-model")])
        demo = ModelConfig.objects.get(model_id="demo")
        return user, conversation_create(owner=user, team=team), demo

    user, conversation, demo = await database_sync_to_async(setup)()
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "hi", "model": demo.pk})
    error = await ws.receive_json_from()
    assert error["code"] == "model_unavailable"
    # A conversation left on a model the team no longer allows is refused too.
    await Conversation.objects.filter(pk=conversation.pk).aupdate(model=demo)
    await ws.send_json_to({"type": "send", "text": "hi"})
    error = await ws.receive_json_from()
    assert error["code"] == "model_unavailable" and "may not use Demo" in error["message"]
    assert fake_upstream.chat_requests() == []
    await ws.disconnect()


@pytest.mark.django_db
def test_new_chats_are_charged_to_the_chosen_team(client):
    user = user_create()
    first, second = team_create(name="First", members=[user]), team_create(name="Second")
    teams.membership_set(user=user, team=second)
    client.force_login(user)
    conversation = Conversation.objects.get(pk=client.post("/api/conversations/").json()["id"])
    assert conversation.team == first
    response = client.post("/settings/team/", {"team": second.pk})
    assert response.status_code == 302
    conversation = Conversation.objects.get(pk=client.post("/api/conversations/").json()["id"])
    assert conversation.team == second
    assert "selected>Second" in client.get("/settings/").content.decode()


@pytest.mark.django_db
def test_a_user_moved_out_of_a_team_cannot_keep_charging_it():
    user = user_create()
    old, new = team_create(name="Old", members=[user]), team_create(name="New")
    conversation = conversation_create(owner=user, team=old)
    teams.membership_move(user=user, team=new)
    error = refusal(conversation)
    assert error.code == "not_in_team" and "team Old" in error.message
    assert teams.current_team_for(user) == new


# ---- rate limit -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_rate_limit_per_user_per_minute(clock, settings):
    settings.USER_REQUESTS_PER_MINUTE = 3
    user, other = user_create(), user_create()
    clock.set(at(2026, 11, 15, 12, 0, 10))
    for _ in range(3):
        teams.rate_limit_check(user=user)
    with pytest.raises(ClientError) as caught:
        teams.rate_limit_check(user=user)
    assert caught.value.code == "rate_limited"
    assert caught.value.message == "You can send 3 messages a minute. Try again in 60 seconds."
    teams.rate_limit_check(user=other)  # per user
    clock.set(at(2026, 11, 15, 12, 1, 10))
    teams.rate_limit_check(user=user)  # a minute after the burst


@pytest.mark.django_db
def test_a_burst_across_a_minute_boundary_is_held_to_the_limit(clock, settings):
    """The window slides: the limit counts the last 60 seconds, not the calendar minute, so
    three sends at 12:00:59 and three more at 12:01:00 are not six in two seconds."""
    settings.USER_REQUESTS_PER_MINUTE = 3
    user = user_create()
    clock.set(at(2026, 11, 15, 12, 0, 59))
    for _ in range(3):
        teams.rate_limit_check(user=user)
    clock.set(at(2026, 11, 15, 12, 1, 0))
    with pytest.raises(ClientError) as caught:
        teams.rate_limit_check(user=user)
    assert caught.value.message == "You can send 3 messages a minute. Try again in 59 seconds."
    clock.set(at(2026, 11, 15, 12, 1, 58))
    for _ in range(5):  # refused attempts are not counted against the user
        with pytest.raises(ClientError):
            teams.rate_limit_check(user=user)
    clock.set(at(2026, 11, 15, 12, 1, 59))  # the burst has left the window
    for _ in range(3):
        teams.rate_limit_check(user=user)
    with pytest.raises(ClientError):
        teams.rate_limit_check(user=user)


@pytest.mark.django_db(transaction=True)
async def test_rate_limited_send_is_refused_on_the_socket(settings):
    settings.USER_REQUESTS_PER_MINUTE = 1
    user = await database_sync_to_async(user_create)()
    conversation = await database_sync_to_async(conversation_create)(owner=user)
    ws = await connect(user, conversation.pk)
    await ws.receive_json_from()
    await ws.send_json_to({"type": "send", "text": "first"})
    await receive_until(ws, "reply.end")
    await ws.send_json_to({"type": "send", "text": "second"})
    frames = await receive_until(ws, "error")
    assert frames[-1]["code"] == "rate_limited" and "1 messages a minute" in frames[-1]["message"]
    assert await Message.objects.filter(content="second").aexists() is False
    await ws.disconnect()


# ---- pages ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_settings_page_shows_my_month_usage(client, clock):
    user = user_create()
    team = team_create(members=[user])
    spent(user=user, team=team, cost="1.25", when=at(2026, 11, 3), prompt=1000, cached=400)
    spent(user=user, team=team, cost="9", when=at(2026, 10, 3), prompt=5000)  # last month
    client.force_login(user)
    html = client.get("/settings/").content.decode()
    assert "November 2026" in html
    assert '<dd id="my-spend">$1.2500</dd>' in html and '<dd id="my-tokens">1000</dd>' in html


@pytest.mark.django_db
def test_team_page_shows_members_spend_and_budget_left(client, clock):
    boss, worker = user_create(username="boss"), user_create(username="worker")
    team = team_create(
        name="Research", members=[worker], admins=[boss], monthly_budget_usd=Decimal("20")
    )
    spent(user=worker, team=team, cost="7.5", when=at(2026, 11, 4), prompt=3000, cached=1000)
    client.force_login(boss)
    html = client.get("/team/").content.decode()
    assert "Research" in html and "worker" in html and "$7.5000" in html
    assert '<dd class="budget-left">$12.50</dd>' in html
    assert "3000 (1000)" in html


@pytest.mark.django_db
def test_usage_report_groups_by_team_user_model_and_day_with_cache_share(client, clock):
    staff = user_create(is_staff=True)
    ada, bob = user_create(username="ada"), user_create(username="bob")
    alpha, beta = team_create(name="Alpha", members=[ada]), team_create(name="Beta", members=[bob])
    spent(user=ada, team=alpha, cost="1.00", when=at(2026, 11, 2, 9), prompt=1000, cached=750)
    spent(user=bob, team=beta, cost="3.00", when=at(2026, 11, 5, 9), prompt=3000, cached=250)
    spent(user=bob, team=beta, cost="100", when=at(2026, 10, 5, 9), prompt=1)  # October
    client.force_login(staff)
    html = client.get("/usage/?month=2026-11").content.decode()
    assert "Usage in November 2026" in html
    assert '<dd id="total-spend">$4.0000</dd>' in html
    assert '<dd id="cache-share">25%</dd>' in html  # 1000 of 4000 prompt tokens
    assert "<svg" in html and "2026-11-02: $1.0000" in html and "2026-11-05: $3.0000" in html
    for section in ("By team", "By user", "By model", "By day"):
        assert section in html
    rows = list(csv.reader(io.StringIO(client.get("/usage.csv?month=2026-11").content.decode())))
    assert rows[0][:3] == ["month", "group", "key"]
    body = {(r[1], r[2]): r for r in rows[1:]}
    assert body[("team", "Alpha")][7] == "1.000000" and body[("team", "Alpha")][8] == "0.75"
    assert body[("user", "bob")][4] == "3000"
    assert body[("day", "2026-11-05")][7] == "3.000000"
    assert body[("Total", "Total")][7] == "4.000000"
    october = client.get("/usage.csv?month=2026-10").content.decode()
    assert "100.000000" in october and "1.000000" not in october


def test_month_bounds_are_calendar_months():
    start, end = teams.month_bounds(at(2026, 12, 31, 23, 0))
    assert (start, end) == (at(2026, 12, 1), at(2027, 1, 1))
    assert timezone.is_aware(start)
