"""Small keyword-only factories for test data."""

import itertools

from django.contrib.auth import get_user_model

from chatapp.model_catalog import default_model_for
from chatapp.models import Conversation

_counter = itertools.count(1)


def user_create(*, username: str | None = None, password: str = "pw-for-tests-123", **extra):
    username = username or f"user{next(_counter)}"
    return get_user_model().objects.create_user(username=username, password=password, **extra)


def conversation_create(*, owner, model=None, **extra) -> Conversation:
    return Conversation.objects.create(
        owner=owner, model=model or default_model_for(owner), **extra
    )
