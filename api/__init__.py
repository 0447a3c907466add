"""HTTP layer: the OpenAI-compatible Flask app and the `pokeserve` command line."""
