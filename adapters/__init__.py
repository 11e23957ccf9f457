# pi_backend.adapters: integrations with serving stacks (installed from the repository's adapters/ folder)
