"""The command line: ``cnnkit TASK MODE [options]``. Parsing and printing only."""
