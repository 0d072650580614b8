import sys

from aligner_client.cli import main

sys.exit(main())
