"""A Python client for resnet-serve's REST API (``pip install "resnet-serve[client]"``).

    from resnet_serve.client import Client

    with Client("http://127.0.0.1:8000") as c:
        top5 = c.classify("cat.jpg")            # [Prediction(index, label, score), ...]
        vectors = c.embed(["a.jpg", "b.jpg"])   # numpy float32 [2, D]

Images may be paths, encoded bytes, PIL images or uint8 arrays. Errors are the classes of
``resnet_serve.client.errors``, one per error code of the service.
"""

from resnet_serve.client.aio import AsyncClient
from resnet_serve.client.errors import ServeError
from resnet_serve.client.protocol import Prediction
from resnet_serve.client.sync import Client

__all__ = ["AsyncClient", "Client", "Prediction", "ServeError"]
