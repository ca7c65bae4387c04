"""`python -m simmatch.selftest`: one rank of the self-test (tools/selftest.py starts them)."""
import sys

from simmatch.selftest.runner import main

sys.exit(main())
