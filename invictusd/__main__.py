import sys

from invictusd.cli import main

sys.exit(main())
