"""The server's error class: an HTTP status plus OpenAI's error fields."""
from __future__ import annotations

from typing import Optional

from cosyjax.errors import CosyJaxError

__all__ = ["ServeError"]


class ServeError(CosyJaxError):
    """A request the server refuses; rendered as `{"error": {"message", "type", "param", "code"}}`.

    status: HTTP status (4xx for the client's mistakes, 501 for a capability the model folder lacks).
    """

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
