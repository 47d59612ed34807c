"""A decoder module that takes seconds to import (SLOW_IMPORT_S, 3 unless set), as av and decord do
on a busy node; in a child process that is not meant to start (FAIL_CHILD_IMPORT set) it fails to import."""
import os
import time

if os.environ.get("FAIL_CHILD_IMPORT"):
    raise ImportError("this decoder cannot be imported here")
time.sleep(float(os.environ.get("SLOW_IMPORT_S", "3")))


def echo(x):
    return x
