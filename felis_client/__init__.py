"""A small Python client for the felis HTTP API (httpx only: no torch, no FastAPI).

    from felis_client import Client

    felis = Client()                      # FELIS_URL / FELIS_API_KEY, or ~/.config/felis/config.toml
    felis.create_dataset("pets")
    felis.upload("pets", "photos/")        # a folder per label, a zip, or image files
    run = felis.train("pets", architecture="simple_cnn", epochs=5)
    felis.wait(run["id"], on_progress=print)
    felis.predict("pets", ["cat.jpg"])
"""

from felis_client.client import Client
from felis_client.config import ClientConfig, load_config
from felis_client.errors import FelisError

__all__ = ["Client", "ClientConfig", "FelisError", "load_config"]
