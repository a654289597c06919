"""Typed responses. Unknown fields are kept (extra="allow") so a newer server never breaks an older client."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Token(_Model):
    """One generated token."""

    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class InputToken(_Model):
    """One prompt token (decoder_input_details)."""

    id: int
    text: str
    logprob: float | None = None


class Details(_Model):
    """`details` of /generate (TGI's shape)."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int | None = None
    seed: int | None = None
    prefill: list[InputToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)


class GenerateResponse(_Model):
    """Result of generate(), or the final result of a stream; `version` is the prefix version that served it."""

    generated_text: str
    details: Details | None = None
    version: str | None = None


class StreamDetails(_Model):
    """`details` of the last stream event."""

    finish_reason: str
    generated_tokens: int
    prompt_tokens: int | None = None
    seed: int | None = None


class StreamEvent(_Model):
    """One server-sent event of /generate_stream: a token; the last one also has generated_text and details."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class PrefixInfo(_Model):
    """A stored prefix: its task name, version (sha256) and manifest."""

    task: str
    version: str
    manifest: dict[str, Any] = Field(default_factory=dict)

    @property
    def prefix_length(self) -> int | None:
        """Virtual tokens of the prefix, when the manifest says."""
        return self.manifest.get("prefix_length")


class PrefixVersion(_Model):
    """One version of a task (issue 4's GET /prefixes/NAME/versions); extra fields as the server sends them."""

    version: str
    current: bool | None = None
    created: float | str | None = None  # unix seconds, as the store records it
    manifest: dict[str, Any] | None = None


class DeleteResult(_Model):
    """Answer of DELETE /prefixes/NAME."""

    task: str
    deleted: str


class Usage(_Model):
    """OpenAI usage block."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(_Model):
    """One choice of /v1/completions (also one chunk's choice when streaming)."""

    index: int
    text: str
    finish_reason: str | None = None


class Completion(_Model):
    """/v1/completions response (or one streamed chunk, with choices holding the new text)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    version: str | None = None


class ChatMessage(_Model):
    """A chat message."""

    role: str
    content: str | None = None


class ChatChoice(_Model):
    """One choice of /v1/chat/completions."""

    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    """/v1/chat/completions response."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    version: str | None = None


class ModelInfo(_Model):
    """One entry of /v1/models: the base model or a task."""

    id: str
    object: str = "model"
    version: str | None = None
