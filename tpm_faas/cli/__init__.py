"""The ``tpm-faas`` command line: one thin module per command group.

Each module only parses options and prints; what a command does lives in its domain module
(the policy in :mod:`tpm_faas.policy`, ledger reports in :mod:`tpm_faas.gateway.reports`,
shard groups in :mod:`tpm_faas.launcher`, ...). Heavy modules are imported inside the
commands, so ``tpm-faas --help`` stays light. Expected failures end in one place,
:class:`~tpm_faas.cli._app.TPMGroup`: one line on stderr and an exit code of the error tree.
"""

from __future__ import annotations

import click

from tpm_faas.cli._app import TPMGroup, exit_codes_text
from tpm_faas.cli.auth import auth as _auth
from tpm_faas.cli.demo import demo as _demo
from tpm_faas.cli.endpoint import endpoint as _endpoint
from tpm_faas.cli.launch import deploy as _deploy
from tpm_faas.cli.launch import launch as _launch
from tpm_faas.cli.ledger import ledger as _ledger
from tpm_faas.cli.ledger import usage as _usage
from tpm_faas.cli.models import models as _models
from tpm_faas.cli.models import schema as _schema
from tpm_faas.cli.models import sites as _sites
from tpm_faas.cli.plan import plan as _plan
from tpm_faas.cli.policy import policy as _policy
from tpm_faas.cli.register import register as _register
from tpm_faas.cli.replay import replay as _replay
from tpm_faas.cli.results import results as _results
from tpm_faas.modes import MODE_NAMES

__all__ = ["main"]


@click.group(
    cls=TPMGroup,
    help=f"Serve a large frozen model in {len(MODE_NAMES)} modes ({', '.join(MODE_NAMES)}) "
    "through Globus Compute.",
    epilog=exit_codes_text(),
)
@click.version_option(package_name="tpm-faas")
def main() -> None:
    pass


for _command in (
    _demo,
    _launch,
    _deploy,
    _register,
    _endpoint,
    _models,
    _sites,
    _schema,
    _plan,
    _policy,
    _usage,
    _ledger,
    _results,
    _replay,
    _auth,
):
    main.add_command(_command)
