"""The one exception a user sees as a refusal: {"type": "error", "code", "message"}.

Its own module so every layer (access, teams, attachments, context window, consumers, views)
can raise it without importing the others.
"""


class ClientError(Exception):
    """A refusal the user sees as {"type": "error", "code", "message"}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
