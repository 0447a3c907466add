"""HTTP layer: the OpenAI-compatible Flask app and the `pokeserve` command line.

    from api import create_app      # create_app(engine, config) -> Flask app
"""


def create_app(engine=None, config=None):
    from api.app import create_app as _create_app  # lazily: the CLI imports this package

    return _create_app(engine, config)
