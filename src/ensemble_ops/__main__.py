import sys

from ensemble_ops.cli.main import main

sys.exit(main())
