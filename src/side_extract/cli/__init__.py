"""The ``side`` command line: one module per subcommand; each parses, builds a config, calls the library."""
