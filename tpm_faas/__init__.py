"""tpm_faas: serve one shared, frozen large model in three modes through Globus Compute."""
