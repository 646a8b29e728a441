"""Prepare one shape's database for the benchmark (run with that shape's environment).

`python -m bench.seed COUNT` creates the bench user (for the login form), COUNT users each with
one empty conversation on the fake upstream's model and a session, and two history probes: a conversation with 2 earlier messages and one with
500 (plus 50 images when the app stores attachments), so queries per send can be compared
across conversation lengths. Prints {"username", "password", "conversations", "cookies",
"probe_small", "probe_large", ...} as JSON.
"""

import json
import os
import sys

import django

USERNAME = "bench"
PASSWORD = "bench-password-not-secret"
LONG_HISTORY = 500
LONG_HISTORY_IMAGES = 50


def _history(conversation, count: int, model) -> None:
    from chatapp.models import Message

    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT,
            content=f"earlier message {i} " + "lorem ipsum " * 20,
            status=Message.Status.COMPLETE,
            model=None if i % 2 == 0 else model,
        )
        for i in range(count)
    )


def _images(conversation, count: int) -> int:
    """Attach one small processed image to each of the first `count` user messages, through
    the app's own pipeline and attachment service (0 when this version has no attachments)."""
    try:
        from chatapp.attachments import attachment_create
    except ImportError:
        return 0
    import io

    from PIL import Image

    from chatapp.images import process_upload
    from chatapp.models import Attachment, Message

    users = list(conversation.messages.filter(role=Message.Role.USER).order_by("id")[:count])
    for i, message in enumerate(users):
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (i * 5 % 256, 80, 40)).save(buf, "PNG")
        attachment = attachment_create(
            owner=conversation.owner,
            conversation=conversation,
            filename=f"history-{i}.png",
            processed=process_upload(buf.getvalue()),
        )
        Attachment.objects.filter(pk=attachment.pk).update(message=message)
    return len(users)


def _session_cookie(user) -> str:
    """A logged-in session for `user`, stored as django.contrib.auth.login stores it."""
    from importlib import import_module

    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.utils.crypto import get_random_string

    session = import_module(settings.SESSION_ENGINE).SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    # A CSRF secret of the user's own, as the page gets it: the load generator creates its
    # conversation over HTTP (POST /api/conversations/) like the page does.
    csrf = get_random_string(32)
    return (
        f"{settings.SESSION_COOKIE_NAME}={session.session_key}; {settings.CSRF_COOKIE_NAME}={csrf}"
    )


def main() -> None:
    count = int(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from chatapp.model_catalog import catalog_sync
    from chatapp.models import Conversation, ModelConfig

    catalog_sync()
    model = ModelConfig.objects.get(provider__kind="openai_compat", model_id="bench")
    User = get_user_model()
    user, _ = User.objects.get_or_create(username=USERNAME)
    user.set_password(PASSWORD)
    user.save()
    # One user per conversation, as C people would be (a per-user rate limit applies to sends);
    # their sessions are made here, as a login would, so no C password hashes are needed.
    password = make_password(PASSWORD)
    users = User.objects.bulk_create(
        User(username=f"{USERNAME}{i}", password=password) for i in range(count + 2)
    )
    made = Conversation.objects.bulk_create(
        Conversation(owner=owner, model=model, title=f"bench {i}")
        for i, owner in enumerate(users[:count])
    )
    small = Conversation.objects.create(owner=users[-2], model=model, title="probe: short")
    _history(small, 2, model)
    large = Conversation.objects.create(owner=users[-1], model=model, title="probe: long")
    _history(large, LONG_HISTORY, model)
    images = _images(large, LONG_HISTORY_IMAGES)
    cookies = [_session_cookie(u) for u in users]
    print(
        json.dumps(
            {
                "username": USERNAME,
                "password": PASSWORD,
                "conversations": [c.pk for c in made],
                "cookies": cookies[:count],
                "probe_small": small.pk,
                "probe_small_cookie": cookies[-2],
                "probe_large_cookie": cookies[-1],
                "probe_large": large.pk,
                "probe_large_messages": LONG_HISTORY,
                "probe_large_images": images,
            }
        )
    )


if __name__ == "__main__":
    main()
