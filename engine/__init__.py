"""pokeserve's serving core."""
