"""`python -m tgdp.launch`: see tgdp/launch/submit.py."""

import sys

from tgdp.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
