"""trio_gw.client: a Trio client for a trio_gw hub that reconnects by itself.

Import it as ``import trio_gw.client`` (``import trio_gw`` does not load it).
The public API is exactly what this module re-exports.
"""

from ._client import Client as Client
from ._client import ClientState as ClientState
from ._client import ClientStatistics as ClientStatistics
from ._client import MessagesLost as MessagesLost
from ._client import TokenProvider as TokenProvider
from ._client import open_client as open_client
from ._errors import ClientClosedError as ClientClosedError
from ._errors import ClientError as ClientError
from ._errors import ConnectFailedError as ConnectFailedError
from ._errors import ConnectionLostError as ConnectionLostError
from ._errors import HandshakeRefusedError as HandshakeRefusedError
from ._errors import ProtocolError as ProtocolError
from ._errors import RequestError as RequestError
from ._errors import RequestTimeoutError as RequestTimeoutError
from ._policy import Backoff as Backoff

__all__ = [
    "Backoff",
    "Client",
    "ClientClosedError",
    "ClientError",
    "ClientState",
    "ClientStatistics",
    "ConnectFailedError",
    "ConnectionLostError",
    "HandshakeRefusedError",
    "MessagesLost",
    "ProtocolError",
    "RequestError",
    "RequestTimeoutError",
    "TokenProvider",
    "open_client",
]
