"""The OpenAI-compatible server: `create_app(engine, model_id=...)` (FastAPI) and `longctx serve`."""

from longctx.serve.app import create_app

__all__ = ["create_app"]
