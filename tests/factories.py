"""Small keyword-only factories for test data."""

import itertools

from django.contrib.auth import get_user_model

from chatapp import teams
from chatapp.model_catalog import default_model_for
from chatapp.models import Conversation, Membership, Team

_counter = itertools.count(1)


def user_create(*, username: str | None = None, password: str = "pw-for-tests-123", **extra):
    username = username or f"user{next(_counter)}"
    return get_user_model().objects.create_user(username=username, password=password, **extra)


def conversation_create(*, owner, model=None, **extra) -> Conversation:
    return Conversation.objects.create(
        owner=owner, model=model or default_model_for(owner), **extra
    )


def team_create(*, name: str | None = None, members=(), admins=(), **extra) -> Team:
    team = Team.objects.create(name=name or f"team{next(_counter)}", **extra)
    for user in members:
        teams.membership_set(user=user, team=team, role=Membership.Role.MEMBER)
    for user in admins:
        teams.membership_set(user=user, team=team, role=Membership.Role.ADMIN)
    return team
