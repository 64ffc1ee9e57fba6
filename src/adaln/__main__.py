import sys

from adaln.cli import main

sys.exit(main())
