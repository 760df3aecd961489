"""tpm_faas: serve one shared, frozen large model in three modes through Globus Compute.

The public surface is re-exported here; importing it loads no heavy dependency (torch,
deepspeed, parsl and the Globus Compute packages are imported only where they are used).
"""

from tpm_faas.client import Result, TPMClient, Transport
from tpm_faas.config import Settings
from tpm_faas.errors import (
    AuthError,
    ConfigError,
    LedgerError,
    PolicyDenied,
    RemoteError,
    RequestError,
    ShardGroupError,
    TPMError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "ConfigError",
    "LedgerError",
    "PolicyDenied",
    "RemoteError",
    "RequestError",
    "Result",
    "Settings",
    "ShardGroupError",
    "TPMClient",
    "TPMError",
    "Transport",
]
