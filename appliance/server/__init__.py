"""The HTTP application: factory, state, request context and error mapping."""
