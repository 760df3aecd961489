from tpm_faas.cli import main

main()
