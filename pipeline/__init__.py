"""quanta: discover the quanta of language models."""
