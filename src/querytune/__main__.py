import sys

from querytune.cli import main

sys.exit(main())
