"""picochat serve: the web chat page and an OpenAI-compatible API (app.py, wire format in protocol.py) over a
continuous-batching generation scheduler (scheduler.py)."""
