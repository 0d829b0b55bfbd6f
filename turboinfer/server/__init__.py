"""The OpenAI-compatible HTTP server: `turboinfer serve`, or `build_app(AsyncEngine(...), name)` to embed it."""
