"""Serving without HTTP: the continuous-batching engine, its image-context cache and metrics, and the thread that runs
the engine for an asyncio server."""
