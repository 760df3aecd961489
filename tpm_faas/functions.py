"""The functions registered with Globus Compute: one per mode.

Each takes a JSON request string and the caller's access token for the TPM resource server,
runs the gateway pipeline in the endpoint's worker and returns a JSON string: a result with
usage and receipt, or an error record with a code. They are registered as source text
(``PureSourceTextInspect``), so each body imports what it needs; arguments and results travel
as JSON only.
"""


def query(request_json: str, token: str | None = None) -> str:
    """Generate text for prompt(s). See :class:`tpm_faas.protocol.requests.QueryRequest`."""
    from tpm_faas.gateway.pipeline import handle

    return handle("query", request_json, token)


def embed(request_json: str, token: str | None = None) -> str:
    """Run custom inputs through the frozen core.

    See :class:`tpm_faas.protocol.requests.EmbedRequest`.
    """
    from tpm_faas.gateway.pipeline import handle

    return handle("embed", request_json, token)


def intervene(request_json: str, token: str | None = None) -> str:
    """Read and write hidden states at hook sites.

    See :class:`tpm_faas.protocol.requests.InterveneRequest`.
    """
    from tpm_faas.gateway.pipeline import handle

    return handle("intervene", request_json, token)


MODE_FUNCTIONS = {"query": query, "embed": embed, "intervene": intervene}
