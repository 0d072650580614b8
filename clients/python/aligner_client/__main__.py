from aligner_client.cli import main
import sys
sys.exit(main())
