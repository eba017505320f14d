"""The `smolvlm-edge` command line."""
import sys
def main(argv=None):
    print("stub")
    return 0
