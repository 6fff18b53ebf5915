import sys

from ppcl.cli import main

sys.exit(main())
