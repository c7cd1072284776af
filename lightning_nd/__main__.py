"""``python -m lightning_nd`` runs the ``lnd`` command."""

from lightning_nd.cli import main

if __name__ == "__main__":
    main()
