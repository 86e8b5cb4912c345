"""Serving: the OpenAI protocol, the engines and the Ray Serve application."""
