"""Python client for prefixserve: `Client` (blocking) and `AsyncClient` (asyncio), typed responses and errors."""
from prefixserve_client._core import RetryPolicy
from prefixserve_client.async_client import AsyncClient, AsyncStream
from prefixserve_client.client import Client, Stream
from prefixserve_client.errors import (AuthenticationError, BadRequestError, ConflictError, ConnectionFailed,
                                       NotFoundError, PrefixServeError, QuotaExceededError, RateLimitError,
                                       ServerError, UnavailableError)
from prefixserve_client.types import (ChatCompletion, Completion, DeleteResult, Details, GenerateResponse,
                                      ModelInfo, PrefixInfo, PrefixVersion, StreamEvent, Token)

__version__ = "0.1.0"
__all__ = ["AsyncClient", "AsyncStream", "AuthenticationError", "BadRequestError", "ChatCompletion", "Client",
           "Completion", "ConflictError", "ConnectionFailed", "DeleteResult", "Details", "GenerateResponse",
           "ModelInfo", "NotFoundError", "PrefixInfo", "PrefixServeError", "PrefixVersion", "QuotaExceededError",
           "RateLimitError", "RetryPolicy", "ServerError", "Stream", "StreamEvent", "Token", "UnavailableError"]
