"""Model serving engines (embedded transformers engine, vLLM client) behind one interface."""
