"""Every access rule, once: the getters that views, consumers and services go through.

Each raises Http404 (or ClientError for a model) when the user may not use the object, so a
forbidden object looks exactly like a missing one.
"""

from django.http import Http404

from .errors import ClientError
from .model_catalog import models_for_user
from .models import Attachment, Batch, BatchItem, Conversation, ModelConfig


def conversation_get_for_user(user, pk) -> Conversation:
    """The one access rule for a conversation: raises Http404 when the user may not see it.

    Only its owner, while their account is active, may see or use a conversation. Nobody else
    does through the app: not a member of the same team, not a team admin (they see members'
    spend and tokens, never their chats), not staff (staff read conversations in the Django
    admin only). Every view, upload, image, export and socket goes through here.
    """
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such conversation")
    try:
        return Conversation.objects.select_related("model__provider").get(pk=pk, owner=user)
    except (Conversation.DoesNotExist, ValueError, TypeError):
        raise Http404("No such conversation") from None


def model_get_for_user(user, model_pk) -> ModelConfig:
    for model in models_for_user(user):
        if str(model.pk) == str(model_pk):
            return model
    raise ClientError("model_unavailable", "That model is not available to you.")


def attachment_get_for_user(user, pk) -> Attachment:
    """Raises Http404 unless `user` may see this image."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such image")
    try:
        attachment = Attachment.objects.select_related("thumbnail").get(pk=pk)
    except (Attachment.DoesNotExist, ValueError, TypeError):
        raise Http404("No such image") from None
    if attachment.message_id is None:
        if attachment.owner_id != user.pk:
            raise Http404("No such image")
    else:
        conversation_get_for_user(user, attachment.conversation_id)
    return attachment


def batch_get_for_user(user, pk) -> Batch:
    """The one access rule for a batch: like a conversation, only its owner while active sees
    or controls it (team admins see its spend on the usage and team pages, never its items)."""
    if not user.is_authenticated or not user.is_active:
        raise Http404("No such batch")
    try:
        return Batch.objects.select_related("model__provider", "team").get(pk=pk, owner=user)
    except (Batch.DoesNotExist, ValueError, TypeError):
        raise Http404("No such batch") from None


def batch_item_get_for_user(user, batch_pk, item_pk) -> BatchItem:
    batch = batch_get_for_user(user, batch_pk)
    try:
        return batch.items.select_related("attachment", "batch__model", "batch__team").get(
            pk=item_pk
        )
    except (BatchItem.DoesNotExist, ValueError, TypeError):
        raise Http404("No such item") from None
