"""``python -m tpm_faas``: the ``tpm-faas`` command."""

from tpm_faas.cli import main

main(prog_name="tpm-faas")
