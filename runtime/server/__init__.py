"""Ember's HTTP/WebSocket server (Starlette, served by uvicorn)."""
