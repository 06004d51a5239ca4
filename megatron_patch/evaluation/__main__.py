import sys

from megatron_patch.evaluation.run import main

sys.exit(main())
