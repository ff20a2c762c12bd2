import sys

from p2p_fl.cli import main

sys.exit(main())
