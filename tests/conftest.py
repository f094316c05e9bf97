"""What every test run shares."""

import signal

# A run started in the background of a non-interactive shell (`cmd &` in a script) inherits
# SIGINT ignored, and an ignored signal stays ignored across exec: every program a test starts
# would ignore Ctrl-C, and the tests that interrupt `labvm top` would wait on it for good. A
# signal this process catches is back to its default in each program it starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
