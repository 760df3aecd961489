"""What every command shares: the one error boundary, file readers, JSON and progress output.

:class:`TPMGroup` is the root group's class. Every expected failure of any command ends in its
:meth:`~TPMGroup.invoke`, where :func:`expected_failure` turns it into one line on stderr
(``tpm-faas: error: ...``) and the exit code of the error tree (:mod:`tpm_faas.errors`):
errors of the tree, missing or unreadable files a user named, invalid YAML, a ledger database
that fails, and a Globus service that cannot be reached. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tpm_faas.errors import (
    AuthError,
    ConfigError,
    LedgerError,
    PolicyDenied,
    RemoteError,
    RequestError,
    ServiceUnreachable,
    ShardGroupError,
    TPMError,
)

PROG = "tpm-faas"

#: Exit code of a Globus service (Auth, Compute) that cannot be reached.
NETWORK_EXIT = ServiceUnreachable.exit_code

#: The exit codes ``tpm-faas --help`` and docs/cli.md list, from the error tree.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (TPMError.exit_code, "a check found problems (ledger reconcile, demo)"),
    (RequestError.exit_code, "a bad argument or request (also click's usage errors)"),
    (AuthError.exit_code, "Globus Auth refused the credentials or the scopes"),
    (PolicyDenied.exit_code, "the site policy denies (policy explain)"),
    (LedgerError.exit_code, "the SU ledger: its database cannot be reached, unknown project"),
    (ShardGroupError.exit_code, "a shard group did not start, or stopped answering"),
    (
        ConfigError.exit_code,
        "a missing, unreadable or invalid file; a missing home directory or extra",
    ),
    (RemoteError.exit_code, "an error raised on the endpoint"),
    (ServiceUnreachable.exit_code, "a Globus service (Auth, Compute) cannot be reached"),
)


def exit_codes_text() -> str:
    """The exit codes as an indented table (``\\b`` keeps click from rewrapping it)."""
    rows = "\n".join(f"  {code}  {what}" for code, what in EXIT_CODES)
    return f"\b\nExit codes:\n{rows}"


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def expected_failure(e: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code of an expected failure; ``None`` for a bug."""
    if isinstance(e, TPMError):
        return e.message, e.exit_code
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}", ConfigError.exit_code
    yaml = sys.modules.get("yaml")
    if yaml is not None and isinstance(e, yaml.YAMLError):
        return f"not valid YAML: {e}", ConfigError.exit_code
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError):
        reason = str(e.orig if e.orig is not None else e).strip().splitlines() or ["failed"]
        return f"the ledger database failed: {reason[0]}", LedgerError.exit_code
    return _network_failure(e)


def _network_failure(e: BaseException) -> tuple[str, int] | None:
    """A Globus SDK or ``requests`` connection failure: which URL could not be reached."""
    requests_exc = sys.modules.get("requests.exceptions")
    globus_sdk = sys.modules.get("globus_sdk")
    original: BaseException | None = None
    if globus_sdk is not None and isinstance(e, globus_sdk.NetworkError):
        original = e.underlying_exception
    elif requests_exc is not None and isinstance(
        e, requests_exc.ConnectionError | requests_exc.Timeout
    ):
        original = e
    if original is None:
        return None
    request = getattr(original, "request", None)
    url = getattr(request, "url", None) or "a Globus service"
    url = str(url).split("?", 1)[0]
    timed_out = requests_exc is not None and isinstance(original, requests_exc.Timeout)
    how = "timed out" if timed_out else "connection failed"
    if requests_exc is not None and isinstance(original, requests_exc.ProxyError):
        how = "the proxy refused or failed the connection"
    return f"cannot reach {url}: {how} (is the network up?)", NETWORK_EXIT


class TPMGroup(click.Group):
    """The root group: runs a command and maps its expected failures to one line each."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            known = expected_failure(e)
            if known is None:
                raise
            message, code = known
            click.echo(f"{PROG}: error: {_one_line(message)}", err=True)
            raise click.exceptions.Exit(code) from None


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path`` (a file a user named); errors name the file."""
    import yaml

    text = path.read_text()  # a missing or unreadable file: the OSError names it
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{what} {path} is not valid YAML: {problem}{where}") from None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    raw = read_yaml(path, what) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping, not a {type(raw).__name__}")
    return raw


def read_json(path: Path, what: str) -> Any:
    text = path.read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None


def echo_json(data: Any, *, indent: int | None = 2) -> None:
    click.echo(json.dumps(data, indent=indent, sort_keys=False, default=str))


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays for results and ``--json``)."""
    click.echo(f".. {message}", err=True)
