import os
import sys

if __name__ == "__main__":
    # Read by the children this process starts (megalong.runtime.orphans.PARENT_PID_VARIABLE;
    # not imported here: the CLI must start without importing torch).
    os.environ["MEGALONG_MAIN_PID"] = str(os.getpid())
    from megalong.cli.main import main

    sys.exit(main())
else:
    # multiprocessing's spawn start method imports the parent's main module (this one, under
    # `python -m megalong`) in every child it starts: Megatron-Core's checkpoint writers.
    from megalong.runtime.orphans import die_with_parent

    die_with_parent()
