"""Sampler checkpoints: the store that turns names into directories (`store`), the
adapter formats read from them (`adapter_config`, `adapter`), and merging an adapter into
the live weights (`merge`). Errors a user's checkpoint can raise are in `errors`."""
