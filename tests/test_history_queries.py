"""Starting a reply costs the same number of queries however long the conversation is."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chatapp.conversations import history_for_request, turn_start
from chatapp.models import Message
from tests.factories import conversation_create, user_create

pytestmark = pytest.mark.django_db


def _queries_for_a_turn(length: int) -> int:
    conversation = conversation_create(owner=user_create())
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT,
            content=f"message {i}",
        )
        for i in range(length)
    )
    with CaptureQueriesContext(connection) as queries:
        _, reply = turn_start(conversation=conversation, text="next question")
        history = history_for_request(conversation, before=reply)
    assert len(history) == length + 1
    return len(queries)


def test_queries_per_send_do_not_grow_with_history():
    assert _queries_for_a_turn(500) == _queries_for_a_turn(2)
