import sys

from turboinfer.cli import main

sys.exit(main())
