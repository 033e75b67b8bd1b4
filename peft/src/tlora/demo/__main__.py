"""`python -m tlora.demo`: the demo's command line (see `tlora.demo.app`)."""

from .app import main

main()
