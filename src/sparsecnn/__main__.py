import sys

from sparsecnn.cli import main

sys.exit(main())
