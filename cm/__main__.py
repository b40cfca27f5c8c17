import sys

from cm.cli import main

sys.exit(main())
