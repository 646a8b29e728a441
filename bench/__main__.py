"""`python -m bench [options]`: the plain-Python equivalent of `make bench`."""

from bench.run import main

main()
