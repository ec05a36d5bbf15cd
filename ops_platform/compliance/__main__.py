import sys

from ops_platform.compliance.cli import main

sys.exit(main())
