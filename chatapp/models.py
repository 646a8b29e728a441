"""Data: providers and their models, conversations and messages, teams and usage.

Writes go through the service modules (conversations.py, generation.py), not through save()
overrides or signals.
"""

import secrets

from django.conf import settings
from django.db import models
from django.utils import timezone

from .images import DEFAULT_MAX_EDGE
from .providers.keys import EncryptedTextField


def new_affinity_id() -> str:
    """`ses_` + 32 hex characters: unguessable, made once per conversation."""
    return "ses_" + secrets.token_hex(16)


class Provider(models.Model):
    class Kind(models.TextChoices):
        MOONSHOT = "moonshot", "Moonshot"
        WORKERS_AI = "workers_ai", "Cloudflare Workers AI"
        OPENAI_COMPAT = "openai_compat", "OpenAI-compatible"
        DEMO = "demo", "Demo (offline)"

    name = models.CharField(max_length=100, unique=True)
    kind = models.CharField(max_length=32, choices=Kind.choices)
    base_url = models.URLField(max_length=500, blank=True)
    # Write-only in the admin, encrypted at rest (providers/keys.py), never sent to a browser.
    api_key = EncryptedTextField(blank=True)
    max_concurrency = models.PositiveIntegerField(
        default=0,
        help_text="Requests in flight at once (0 = unlimited); extra sends wait in line.",
    )
    enabled = models.BooleanField(default=True)
    managed_by_env = models.BooleanField(
        default=False, editable=False, help_text="Seeded from environment variables at start."
    )

    def __str__(self) -> str:
        return self.name


class ModelConfig(models.Model):
    class Status(models.TextChoices):
        AVAILABLE = "available", "Available"
        DEPRECATED = "deprecated", "Deprecated"
        UNAVAILABLE = "unavailable", "Unavailable"

    class Origin(models.TextChoices):
        STAFF = "staff", "Added by staff"
        ENVIRONMENT = "env", "Environment"
        CATALOG = "catalog", "Catalog"
        DISCOVERY = "discovery", "Provider's model list"

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="models")
    model_id = models.CharField("model id", max_length=200, help_text="The id sent upstream.")
    display_name = models.CharField(max_length=200)
    description = models.CharField(max_length=500, blank=True)
    context_window = models.PositiveIntegerField(default=262_144)
    vision = models.BooleanField(default=True, help_text="Can this model see images?")
    max_image_edge = models.PositiveIntegerField(
        default=DEFAULT_MAX_EDGE, help_text="Longest image edge (px) sent to this model."
    )
    reasoning = models.BooleanField(default=False)
    max_output_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Default output budget (reasoning + answer); empty = the site default.",
    )
    price_input = models.DecimalField(
        "input $/M tokens", max_digits=10, decimal_places=4, default=0
    )
    price_cached_input = models.DecimalField(
        "cached input $/M tokens", max_digits=10, decimal_places=4, default=0
    )
    price_output = models.DecimalField(
        "output $/M tokens", max_digits=10, decimal_places=4, default=0
    )
    sort_order = models.IntegerField(default=100, help_text="Lower comes first in the picker.")
    enabled = models.BooleanField(default=True)
    # Facts from the catalog (chatapp/providers/kimi_catalog.json) and the provider's model list.
    family = models.CharField(
        max_length=64, blank=True, help_text="Catalog family (empty = a plain model)."
    )
    video = models.BooleanField(
        default=False, help_text="Can this model take video input (video_url content parts)?"
    )
    max_output_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Largest output the model accepts (empty = the window)."
    )
    contract = models.JSONField(
        default=dict,
        blank=True,
        help_text="The request contract the provider layer applies (thinking, sampling, "
        "reasoning_effort); from the catalog family.",
    )
    price_batch_input = models.DecimalField(
        "batch input $/M tokens", max_digits=10, decimal_places=4, null=True, blank=True
    )
    price_batch_output = models.DecimalField(
        "batch output $/M tokens", max_digits=10, decimal_places=4, null=True, blank=True
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.AVAILABLE)
    status_date = models.DateField(null=True, blank=True)
    status_note = models.CharField(max_length=300, blank=True)
    successor = models.CharField(
        max_length=200, blank=True, help_text="Model id offered instead once this one is gone."
    )
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.STAFF)
    # Names of the fields staff changed in the admin: the catalog sync never writes them.
    staff_overrides = models.JSONField(default=list, blank=True, editable=False)
    structured_output = models.CharField(
        max_length=16,
        choices=[
            ("auto", "Automatic (from the catalog family)"),
            ("json_schema", "JSON schema (response_format json_schema)"),
            ("json_object", "JSON object only (validated by the app)"),
        ],
        default="auto",
        help_text="How batch answers with fields ask for JSON (chatapp/batches.py).",
    )

    class Meta:
        ordering = ["sort_order", "display_name"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "model_id"], name="unique_model_per_provider"
            )
        ]

    def __str__(self) -> str:
        return self.display_name

    @property
    def is_demo(self) -> bool:
        return self.provider.kind == Provider.Kind.DEMO

    @property
    def available(self) -> bool:
        return self.status != self.Status.UNAVAILABLE

    @property
    def reasoning_mode(self) -> str:
        """off | optional (a thinking switch) | always (reasons on every reply)."""
        if not self.reasoning:
            return "off"
        return "always" if (self.contract or {}).get("reasoning") == "always" else "optional"


class Team(models.Model):
    """A group of users sharing a monthly budget and a list of models (chatapp/teams.py)."""

    name = models.CharField(max_length=100, unique=True)
    monthly_budget_usd = models.DecimalField(
        "monthly budget (USD)",
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Empty = unlimited.",
    )
    member_monthly_cap_usd = models.DecimalField(
        "per-member monthly cap (USD)",
        max_digits=12,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="Empty = no cap per member.",
    )
    allowed_models = models.ManyToManyField(
        ModelConfig,
        blank=True,
        related_name="teams",
        help_text="The models this team may use. None selected = every enabled model.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    class Role(models.TextChoices):
        MEMBER = "member", "Member"
        ADMIN = "admin", "Team admin"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    # The team new conversations are started under (one per user; teams.team_choose keeps it so).
    is_current = models.BooleanField(default=False)
    # Set when a sign-in through this identity provider made the membership from the user's
    # groups (oidc.py keeps it in line with them); empty = manual, left alone by the group sync.
    synced_by = models.ForeignKey(
        "OIDCProvider",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="synced_memberships",
        verbose_name="synced from",
        help_text="Empty = manual: the group sync leaves it alone.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["team__name"]
        constraints = [models.UniqueConstraint(fields=["user", "team"], name="unique_membership")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.get_role_display()})"


class OIDCProvider(models.Model):
    """A company identity provider people sign in with (OpenID Connect; chatapp/oidc.py)."""

    slug = models.SlugField(max_length=50, unique=True, help_text="Appears in the sign-in URLs.")
    label = models.CharField(max_length=100, help_text="The button says “Sign in with <label>”.")
    issuer = models.URLField(
        "issuer URL",
        max_length=500,
        help_text="Its discovery document is <issuer>/.well-known/openid-configuration.",
    )
    client_id = models.CharField(max_length=255)
    # Write-only in the admin, encrypted at rest like provider API keys (providers/keys.py).
    client_secret = EncryptedTextField(blank=True)
    scopes = models.CharField(max_length=255, default="openid email profile")
    groups_claim = models.CharField(
        max_length=100, default="groups", help_text="The claim that lists the user's groups."
    )
    allowed_domains = models.TextField(
        "allowed e-mail domains",
        blank=True,
        help_text="One per line or comma-separated; empty = any domain.",
    )
    required_groups = models.TextField(
        blank=True,
        help_text="One per line or comma-separated; the user must be in at least one. "
        "Empty = no group needed.",
    )
    enabled = models.BooleanField(default=True)
    managed_by_env = models.BooleanField(
        default=False, editable=False, help_text="Seeded from the OIDC_* variables at start."
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "identity provider (OpenID Connect)"
        verbose_name_plural = "identity providers (OpenID Connect)"
        ordering = ["label"]

    def __str__(self) -> str:
        return self.label


class OIDCGroupMapping(models.Model):
    """Members of `group` at the identity provider are put in `team` with `role`."""

    provider = models.ForeignKey(
        OIDCProvider, on_delete=models.CASCADE, related_name="group_mappings"
    )
    group = models.CharField(max_length=255, help_text="The group name as the claim lists it.")
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="group_mappings")
    role = models.CharField(
        max_length=16, choices=Membership.Role.choices, default=Membership.Role.MEMBER
    )

    class Meta:
        ordering = ["group", "team__name"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "group", "team"], name="unique_group_mapping"
            )
        ]

    def __str__(self) -> str:
        return f"{self.group} → {self.team} ({self.get_role_display()})"


class OIDCIdentity(models.Model):
    """A user's account at an identity provider (its `sub`), linked to one local user."""

    provider = models.ForeignKey(OIDCProvider, on_delete=models.CASCADE, related_name="identities")
    subject = models.CharField(max_length=255)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="oidc_identities"
    )
    email = models.EmailField(blank=True)
    groups = models.JSONField(default=list, blank=True, help_text="As of the last sign-in.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_login_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "OIDC identities"
        constraints = [
            models.UniqueConstraint(fields=["provider", "subject"], name="unique_oidc_subject")
        ]

    def __str__(self) -> str:
        return f"{self.user} at {self.provider}"


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    # The team it was started under; its replies are charged to it. Null = no team (no limits).
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="conversations"
    )
    title = models.CharField(max_length=200, blank=True)
    model = models.ForeignKey(ModelConfig, on_delete=models.SET_NULL, null=True, blank=True)
    system_prompt = models.TextField(blank=True)
    # Per-conversation request settings; None = the provider's default.
    thinking = models.BooleanField(null=True, blank=True)
    max_output_tokens = models.PositiveIntegerField(null=True, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    reasoning_effort = models.CharField(max_length=16, blank=True)  # "" = the model's default
    affinity_id = models.CharField(
        max_length=40, unique=True, default=new_affinity_id, editable=False
    )
    # The project it belongs to (chatapp/projects.py); its instructions and pinned attachments
    # come first in every request, sent with the project's affinity id.
    project = models.ForeignKey(
        "Project",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="conversations",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming", "Streaming"
        COMPLETE = "complete", "Complete"
        CANCELLED = "cancelled", "Cancelled"
        ERROR = "error", "Error"
        INTERRUPTED = "interrupted", "Interrupted"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    reasoning = models.TextField(blank=True)
    model = models.ForeignKey(ModelConfig, on_delete=models.SET_NULL, null=True, blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True)
    # The model the provider says answered, when it is not the one asked for (a redirect).
    served_model = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    # Assistant tool calls and the provider's reasoning fields, kept exactly as received so
    # they can be re-sent verbatim (Kimi rejects tool-call turns without their reasoning).
    tool_calls = models.JSONField(null=True, blank=True)
    reasoning_details = models.JSONField(null=True, blank=True)
    # Sequence number of the last delta broadcast for this reply (re-attach continues from it).
    seq = models.PositiveIntegerField(default=0)
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    # While streaming: the process writing the reply and until when it promised to be alive
    # (renewed by its heartbeat). A reaper marks a reply whose lease ran out as interrupted.
    owner = models.CharField(max_length=120, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["conversation", "created_at"]),
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(status="streaming"),
                name="message_streaming_lease",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk}"


class UsageRecord(models.Model):
    """One per reply that reached a terminal state; kept when the reply or chat is deleted."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="usage"
    )
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    conversation = models.ForeignKey(
        Conversation, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    message = models.OneToOneField(
        Message, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    model = models.ForeignKey(ModelConfig, on_delete=models.SET_NULL, null=True, blank=True)
    # Names as they were, so the report survives renames and deletions.
    model_name = models.CharField(max_length=200, blank=True)
    provider_name = models.CharField(max_length=100, blank=True)
    # Set when the provider answered with another model (priced at that model's prices).
    served_model = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16, blank=True)
    # Set for an item of a batch (chatapp/batches.py): one record per answered item.
    batch = models.ForeignKey(
        "Batch", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    # One per answered item (a retried failure adds one more, each run answered exactly once).
    batch_item = models.ForeignKey(
        "BatchItem", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage"
    )
    batch_name = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["team", "created_at"]),
            models.Index(fields=["user", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.model_name} ${self.cost_usd}"


class StoredImage(models.Model):
    """Processed image (or normalised video) bytes stored once under MEDIA_ROOT, addressed by
    their SHA-256.

    Shared by every attachment that produced the same bytes; deleted with its file when nothing
    references it any more (attachments.py). Never served by a public URL.
    """

    sha256 = models.CharField(max_length=64, unique=True)
    path = models.CharField(max_length=200, help_text="Relative to MEDIA_ROOT.")
    mime = models.CharField(max_length=32)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    bytes = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.sha256[:12]} {self.width}x{self.height} {self.mime}"


class Attachment(models.Model):
    """One uploaded image: its thumbnail and its ordered parts (tiles of a very tall image).

    Uploaded before the message exists (message and, for a new chat, conversation are empty);
    bound to the user's message when it is sent, in the order the user added them.
    """

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="attachments"
    )
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, null=True, blank=True, related_name="attachments"
    )
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, null=True, blank=True, related_name="attachments"
    )
    position = models.PositiveSmallIntegerField(default=0)
    filename = models.CharField(max_length=150)
    source_format = models.CharField(max_length=16)
    source_width = models.PositiveIntegerField()
    source_height = models.PositiveIntegerField()
    thumbnail = models.ForeignKey(StoredImage, on_delete=models.PROTECT, related_name="+")
    # Sent to the model as text right after the image: what the user's mark-up means ("numbered
    # markers 1-3, highlighted regions"), or which page of which PDF this is.
    note = models.TextField(blank=True)
    # A screen recording: the normalised MP4 sent to models that take video (the parts are its
    # key frames, sent to the others), and its length sent / uploaded.
    video = models.ForeignKey(
        StoredImage, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    seconds = models.FloatField(null=True, blank=True)
    source_seconds = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["position", "id"]
        indexes = [models.Index(fields=["owner", "message", "created_at"])]

    def __str__(self) -> str:
        return self.filename


class AttachmentPart(models.Model):
    """One image sent to the model; an attachment has one, or several ordered tiles."""

    attachment = models.ForeignKey(Attachment, on_delete=models.CASCADE, related_name="parts")
    index = models.PositiveSmallIntegerField()
    image = models.ForeignKey(StoredImage, on_delete=models.PROTECT, related_name="parts")
    # Sent as text before the image (a key frame's timestamp).
    caption = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["index"]
        constraints = [
            models.UniqueConstraint(fields=["attachment", "index"], name="unique_part_index")
        ]

    def __str__(self) -> str:
        return f"{self.attachment_id}/{self.index}"


class AuditEntry(models.Model):
    """One audited event (chatapp/audit.py). Written in the transaction of the change it records;
    never edited; deleted only by retention (AUDIT_RETENTION_DAYS)."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    # The name as it was (kept when the user is renamed or deleted; the attempted username of a
    # failed log-in).
    actor_name = models.CharField(max_length=150, blank=True)
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=100, blank=True)
    object_id = models.CharField(max_length=64, blank=True)
    object_repr = models.CharField(max_length=200, blank=True)
    # {"field": [before, after]} for a change; other small details for other events.
    changes = models.JSONField(default=dict, blank=True)
    address = models.CharField("client address", max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "audit entries"
        indexes = [models.Index(fields=["object_type", "object_id"])]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name or '-'} {self.action}"


class Batch(models.Model):
    """One question over many images, run item by item by a task worker (chatapp/batches.py).

    Its owner's only, like a conversation; charged to the team it was started under.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        PAUSED = "paused", "Paused"
        BUDGET = "budget", "Paused: budget reached"
        COMPLETE = "complete", "Complete"
        CANCELLED = "cancelled", "Cancelled"

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batches"
    )
    team = models.ForeignKey(
        Team, on_delete=models.SET_NULL, null=True, blank=True, related_name="batches"
    )
    model = models.ForeignKey(ModelConfig, on_delete=models.SET_NULL, null=True, blank=True)
    name = models.CharField(max_length=200, blank=True)
    question = models.TextField()
    # [{"name", "type": text|number|date|yesno|choice, "description", "choices": [...]}]
    fields = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    # "live" (items through the chat API in the provider gate) or "workers_ai" (queueRequest).
    mode = models.CharField(max_length=16, default="live")
    estimate = models.JSONField(default=dict, blank=True)
    affinity_id = models.CharField(
        max_length=40, unique=True, default=new_affinity_id, editable=False
    )
    # The runner's heartbeat: a batch still running whose lease ran out lost its worker and is
    # queued again (batches.batches_recover).
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "lease_expires_at"])]

    def __str__(self) -> str:
        return self.name or f"Batch {self.pk}"


class BatchItem(models.Model):
    """One image of a batch and its answer. Answered once: only the claim holder's save lands."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUBMITTED = "submitted", "Submitted"  # in a provider's async batch (request_id)
        DONE = "done", "Done"
        INVALID = "invalid", "Invalid answer"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveIntegerField()
    attachment = models.OneToOneField(
        "Attachment", on_delete=models.SET_NULL, null=True, blank=True, related_name="batch_item"
    )
    filename = models.CharField(max_length=200, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    answer = models.TextField(blank=True)  # the text answer, or the raw JSON when fields are set
    values = models.JSONField(null=True, blank=True)  # the validated fields
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=6, default=0)
    # The claim: who runs it now, until when (a dead worker's items are claimed again).
    claim = models.CharField(max_length=64, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    request_id = models.CharField(max_length=100, blank=True)  # the provider's async batch id
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["position", "id"]
        indexes = [models.Index(fields=["batch", "status"])]
        constraints = [
            models.UniqueConstraint(fields=["batch", "position"], name="unique_batch_position")
        ]

    def __str__(self) -> str:
        return f"{self.batch_id}/{self.position}"


# ---- projects and the prompt library (chatapp/projects.py, chatapp/prompts.py) -----------------


class Project(models.Model):
    """A group of conversations with shared instructions, pinned reference attachments and
    defaults. Personal (owner set) or a team's (team set): exactly one of the two.

    Its instructions and pinned attachments open every request of its conversations,
    byte-identical, sent with its own affinity id so the provider's prefix cache is shared by
    the whole project. A team project never shows a member another member's conversations.
    """

    name = models.CharField(max_length=200)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="projects",
    )
    team = models.ForeignKey(
        Team, on_delete=models.CASCADE, null=True, blank=True, related_name="projects"
    )
    instructions = models.TextField(blank=True)
    default_model = models.ForeignKey(
        ModelConfig, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    max_output_tokens = models.PositiveIntegerField("default output budget", null=True, blank=True)
    affinity_id = models.CharField(
        max_length=40, unique=True, default=new_affinity_id, editable=False
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(owner__isnull=False) & models.Q(team__isnull=True))
                | (models.Q(owner__isnull=True) & models.Q(team__isnull=False)),
                name="project_personal_or_team",
            )
        ]

    def __str__(self) -> str:
        return self.name


class ProjectPin(models.Model):
    """A reference attachment (an uploaded image or PDF page) pinned to a project."""

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="pins")
    attachment = models.OneToOneField(
        Attachment, on_delete=models.CASCADE, related_name="project_pin"
    )
    position = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["position", "id"]

    def __str__(self) -> str:
        return f"{self.project_id}/{self.attachment_id}"


class SavedPrompt(models.Model):
    """A prompt of the library: personal (owner) or a team's (team), with {{variables}}."""

    title = models.CharField(max_length=200)
    text = models.TextField()
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="saved_prompts",
    )
    team = models.ForeignKey(
        Team, on_delete=models.CASCADE, null=True, blank=True, related_name="saved_prompts"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["title", "id"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(owner__isnull=False) & models.Q(team__isnull=True))
                | (models.Q(owner__isnull=True) & models.Q(team__isnull=False)),
                name="prompt_personal_or_team",
            )
        ]

    def __str__(self) -> str:
        return self.title


# ---- sharing a conversation (issue 16: chatapp/sharing.py) -------------------------------------


class ConversationShare(models.Model):
    """A conversation shared, read-only, with the team it is charged to, or with chosen members
    of that team (`members` non-empty). Revoking sets `revoked_at`; the row stays for the
    record. Who may read through it: access.share_get_for_viewer."""

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="shares")
    shared_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="shares_made"
    )
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="shares")
    # Empty = the whole team; otherwise only these members of it.
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="shares_received"
    )
    created_at = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["conversation", "revoked_at"])]

    def __str__(self) -> str:
        return f"{self.conversation} shared with {self.team}"
